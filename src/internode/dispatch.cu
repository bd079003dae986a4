// Internode HT dispatch (internode/internode.hpp): layout and node bitmaps, the count exchange
// over every rank through the RDMA engine, then each token once to every node it goes to (its
// own node's ranks by stores, the others as one message to this rank's partner there), then the
// forwarding of the messages this rank received as partner.
#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "ht/token_metadata.cuh"
#include "internode/internode.hpp"
#include "internode/steps.cuh"
#include "layout/layout.hpp"
#include "layout/layout_steps.cuh"
#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"
#include "runtime/register_budget.hpp"

namespace moecomm::internode {

using detail::DeviceErrorKind;
using detail::kFp8Group;
using detail::kMaxBlockThreads;

namespace {

/// One warp per node: node_bitmap[b] = OR of the rank bitmaps of node b's ranks, then its word
/// prefix and total (num_tokens_per_node).
__device__ void build_node_rows(const DeviceContext& ctx, int64_t used_words, int lane) {
  const int G = ctx.node_size, W = ctx.words;
  const internode::Regions& in = ctx.internode;
  for (int64_t b = global_warp(); b < ctx.num_nodes; b += grid_warps()) {
    uint32_t* bits = in.node_bitmap + b * W;
    for (int64_t w = lane; w < used_words; w += 32) {
      uint32_t word = 0;
      for (int g = 0; g < G; ++g) word |= ctx.layout.rank_bitmap[(b * G + g) * W + w];
      bits[w] = word;
    }
    __syncwarp();
    const int32_t total =
        layout::steps::scan_row(bits, in.node_word_prefix + b * W, used_words, lane);
    if (lane == 0) in.num_tokens_per_node[b] = total;
  }
}

/// Block 0: sends every rank its count message (the row of this rank's counts to every rank, to
/// every node, and to the receiver's experts) through the engine, receives every rank's, and
/// derives the receive side as the intranode count exchange does (send bases, rows and expert
/// counts received, rank prefix, the capacity check, exact sizing's host counts) plus the
/// messages this rank forwards from each node. It is also the handshake: a rank that sent its
/// counts has entered the call. False after a failed wait.
__device__ bool exchange_counts(const DeviceContext& ctx, const DispatchParams& p, uint64_t seq) {
  const int R = ctx.num_ranks, N = ctx.num_nodes, L = ctx.local_experts;
  const int me = ctx.rank, cw = ctx.internode.count_words;
  // The parity counts fresh dispatches, not calls: a sender may run up to one dispatch ahead (it
  // cannot finish that one without this rank's counts), but any number of combines ahead.
  const int parity = static_cast<int>(*ctx.internode.fresh_dispatches & 1);
  const layout::ScanOptions& opt = p.layout.scan;
  const internode::Regions& in = ctx.internode;
  int32_t* stage = window_at<int32_t>(ctx, in.count_stage);
  for (int i = threadIdx.x; i < R * cw; i += blockDim.x) {
    const int d = i / cw, w = i % cw;
    int32_t v = 0;
    if (w < R)
      v = ctx.layout.num_tokens_per_rank[w];
    else if (w < R + N)
      v = in.num_tokens_per_node[w - R];
    else if (w < R + N + L)
      v = ctx.layout.num_tokens_per_expert[d * L + (w - R - N)];
    stage[i] = v;
  }
  __syncthreads();
  const uint64_t msg_bytes = static_cast<uint64_t>(cw) * sizeof(int32_t);
  {
    rdma::WarpPort port(ctx);
    for (int d = threadIdx.x / 32; d < R; d += blockDim.x / 32)
      port.put_signal(d, in.count_recv + (static_cast<uint64_t>(parity) * R + me) * msg_bytes,
                      in.count_stage + d * msg_bytes, msg_bytes,
                      in.sig_counts + me * sizeof(uint64_t), 1);
  }
  bool ok = true;
  for (int q = threadIdx.x; q < R; q += blockDim.x) {
    const uint64_t sig = in.sig_counts + q * sizeof(uint64_t);
    if (rdma::wait_signal(ctx, sig, 1, q, Phase::kRdmaCounts, 0))
      rdma::consume_signal(ctx, sig, 1);
    else
      ok = false;
  }
  ok = __syncthreads_and(ok) != 0;

  const int32_t* matrix = window_at<int32_t>(ctx, in.count_recv) + parity * R * cw;
  auto sent = [&](int s, int d) { return matrix[s * cw + d]; };
  for (int b = threadIdx.x; b < N && p.handle.fwd_expected; b += blockDim.x) {
    // Messages from node b come from this rank's partner there: its count for this node.
    p.handle.fwd_expected[b] = b == ctx.node ? 0 : sent(partner_on(ctx, b), R + ctx.node);
    p.handle.send_per_node[b] = in.num_tokens_per_node[b];
  }
  auto to_expert = [&](int s, int le) { return sent(s, R + N + le); };
  layout::steps::derive_receive_counts(ctx, opt, seq, ok, sent, to_expert,
                                       [](int) { return true; });
  __syncthreads();  // every thread has read the parity
  if (threadIdx.x == 0) *ctx.internode.fresh_dispatches += 1;
  layout::steps::publish_host_counts(ctx, opt);
  return ok;
}

/// Fresh dispatch, one warp: records token t's row at every rank (-1: none or past the capacity,
/// as intranode) and its message slot for every node (-1: none) in the handle.
__device__ void record_route(const DeviceContext& ctx, const DispatchParams& p, int64_t t,
                             int lane) {
  const int R = ctx.num_ranks, N = ctx.num_nodes, W = ctx.words;
  const uint64_t mask = ctx.layout.token_rank_mask[t];
  for (int d = lane; d < R; d += 32) {
    int32_t row = -1;
    if ((mask >> d) & 1ull)
      row = ctx.layout.send_base[d] +
            layout::bitmap_position(ctx.layout.rank_bitmap + static_cast<int64_t>(d) * W,
                                    ctx.layout.rank_word_prefix + static_cast<int64_t>(d) * W, t);
    p.send_row[t * R + d] = row >= ctx.ht.capacity ? -1 : row;
  }
  for (int b = lane; b < N; b += 32) {
    const uint32_t* bits = ctx.internode.node_bitmap + static_cast<int64_t>(b) * W;
    const bool in_node = (bits[t >> 5] >> (t & 31)) & 1u;
    p.handle.node_slot[t * N + b] =
        in_node ? layout::bitmap_position(
                      bits, ctx.internode.node_word_prefix + static_cast<int64_t>(b) * W, t)
                : -1;
  }
  __syncwarp();  // the record is read by every lane below
}

/// Where token t's pieces go. Targets are ranks: the ranks of this node that receive the token
/// (their final rows), and this rank's partner on every other node the token goes to (the
/// message staged for it in this rank's window).
struct Targets {
  const DeviceContext& ctx;
  const int32_t* rows;   // [R] the token's row at each rank
  const int32_t* slots;  // [N] the token's message slot for each node
  int out_row_bytes;
  uint64_t mask = 0;

  __device__ Targets(const DeviceContext& c, const DispatchParams& p, int64_t t, int lane)
      : ctx(c),
        rows(p.send_row + t * c.num_ranks),
        slots(p.handle.node_slot + t * c.num_nodes),
        out_row_bytes(p.out_row_bytes) {
    auto wanted = [&](int d) {
      if (d >= ctx.num_ranks) return false;
      const int b = d / ctx.node_size;
      if (b == ctx.node) return rows[d] >= 0;
      return d == partner_on(ctx, b) && slots[b] >= 0;
    };
    mask = static_cast<uint64_t>(__ballot_sync(kFullMask, wanted(lane))) |
           (static_cast<uint64_t>(__ballot_sync(kFullMask, wanted(lane + 32))) << 32);
  }
  __device__ bool local(int d) const { return d / ctx.node_size == ctx.node; }
  __device__ uint8_t* message(int d) const {
    const int b = d / ctx.node_size;
    return window_at<uint8_t>(
        ctx, entry_offset(ctx, ctx.internode.dispatch_send, b, slots[b], ctx.internode.msg_bytes));
  }
  /// The received row (data) of target d.
  __device__ uint8_t* data(int d) const {
    if (local(d)) return ctx.peers[d] + ctx.ht.x + static_cast<int64_t>(rows[d]) * out_row_bytes;
    return message(d);
  }
  /// The row's scales (fp8) of target d.
  __device__ float* scales(int d) const {
    const int groups = ctx.hidden / kFp8Group;
    if (local(d))
      return transport::peer_region<float>(ctx, d, ctx.ht.scales) +
             static_cast<int64_t>(rows[d]) * groups;
    return reinterpret_cast<float*>(message(d) + out_row_bytes);
  }
};

/// Metadata of token t to every target: local ids, weights and the source token at the ranks of
/// this node; global ids, weights, source token and the rows at the destination node's ranks in
/// each message.
__device__ void write_metadata(const DeviceContext& ctx, const DispatchParams& p, const Targets& to,
                               int64_t t, int lane) {
  const int K = ctx.topk, G = ctx.node_size, E = ctx.num_experts;
  int32_t e = -1;
  float w = 0.0f;
  if (lane < K) {
    const int64_t v = device::load_index(p.topk_idx, p.idx_i64, t * K + lane);
    e = v >= 0 && v < E ? static_cast<int32_t>(v) : -1;  // out of range: recorded by the layout
    if (p.topk_weights) w = p.topk_weights[t * K + lane];
  }
  const int groups = ctx.hidden / kFp8Group;
  for (uint64_t m = to.mask; m;) {
    const int d = pop_lowest(m);
    if (to.local(d)) {
      ht::store_token_metadata(ctx, d, to.rows[d], t, e, w, p.topk_weights != nullptr, lane);
    } else {
      MessageMeta meta(ctx, to.message(d));
      const int b = d / G;
      if (lane < K) {
        meta.experts[lane] = e;
        meta.weights[lane] = w;
      }
      if (lane == 0) *meta.src_token = static_cast<int32_t>(t);
      if (lane < G) meta.rows[lane] = to.rows[b * G + lane];
    }
    if (p.x_scales) {
      float* dst = to.scales(d);
      for (int g = lane; g < groups; g += 32) dst[g] = p.x_scales[t * groups + g];
    }
  }
}

/// The row of token t to every target: copied as it is, or quantised to e4m3 with its scales.
/// Each target's data and scale addresses are worked out once, then shuffled at each piece.
__device__ void write_row(const DeviceContext& ctx, const DispatchParams& p, const Targets& to,
                          int64_t t, int lane) {
  device::RowDestinations rows;
  for (uint64_t m = to.mask; m;) {
    const int d = pop_lowest(m);
    rows.add(to.data(d), to.scales(d), lane);
  }
  const int4* src =
      reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) + t * p.in_row_bytes);
  if (p.quantize)
    device::quantize_row_to(src, ctx.hidden / kFp8Group, p.pow2_scales, rows, lane);
  else
    device::copy_row_to(src, p.in_row_bytes / 16, rows, lane);
}

/// One warp: token t to its node's ranks and, as one message each, to its partners.
__device__ void send_token(const DeviceContext& ctx, const DispatchParams& p, int64_t t, int lane,
                           rdma::WarpPort& port) {
  const Targets to(ctx, p, t, lane);
  if (to.mask == 0) return;
  write_metadata(ctx, p, to, t, lane);
  write_row(ctx, p, to, t, lane);
  const internode::Regions& in = ctx.internode;
  for (uint64_t m = to.mask; m;) {
    const int d = pop_lowest(m);
    if (to.local(d)) continue;
    const int b = d / ctx.node_size, slot = to.slots[b];
    // The warp goes on to its next token while the (modelled) NIC carries this message.
    port.put_signal_later(d, entry_offset(ctx, in.dispatch_recv, ctx.node, slot, in.msg_bytes),
                          entry_offset(ctx, in.dispatch_send, b, slot, in.msg_bytes), in.msg_bytes,
                          chunk_signal(ctx, in.sig_dispatch, ctx.node, slot / kChunkTokens), 1);
  }
}

/// One warp: message j from node `from` (arrived in this rank's window) to the final rows of the
/// ranks of this node it names; the rows are recorded in the handle for combine.
__device__ void forward_message(const DeviceContext& ctx, const DispatchParams& p, int from,
                                int64_t j, int lane) {
  const int K = ctx.topk, L = ctx.local_experts, G = ctx.node_size, me_node = ctx.node;
  const internode::Regions& in = ctx.internode;
  uint8_t* message =
      window_at<uint8_t>(ctx, entry_offset(ctx, in.dispatch_recv, from, j, in.msg_bytes));
  const MessageMeta meta(ctx, message);
  const int32_t row_of_lane = lane < G ? meta.rows[lane] : -1;
  if (lane < G && !p.cached)
    p.handle.fwd_rows[(static_cast<int64_t>(from) * ctx.max_tokens + j) * G + lane] = row_of_lane;
  const uint32_t mask = __ballot_sync(kFullMask, row_of_lane >= 0);
  int32_t e = -1;
  float w = 0.0f;
  if (lane < K) {
    e = meta.experts[lane];
    w = meta.weights[lane];
  }
  const int32_t src_token = *meta.src_token;
  const int groups = ctx.hidden / kFp8Group;
  const float* msg_scales = reinterpret_cast<const float*>(message + p.out_row_bytes);
  // The scales, read once (lane s: groups s and s + 32) rather than once per destination, where
  // every read would wait behind the stores to the previous destination.
  float scale_lo = 0.0f, scale_hi = 0.0f;
  if (p.has_scales) {
    if (lane < groups) scale_lo = msg_scales[lane];
    if (lane + 32 < groups) scale_hi = msg_scales[lane + 32];
  }
  for (uint32_t m = mask; m; m &= m - 1) {
    const int g = __ffs(m) - 1, d = me_node * G + g;
    const int64_t row = __shfl_sync(kFullMask, row_of_lane, g);
    if (lane < K) {
      const bool here = e >= 0 && e / L == d;
      transport::peer_region<int64_t>(ctx, d, ctx.ht.topk_idx)[row * K + lane] =
          here ? e - static_cast<int64_t>(d) * L : -1;
      if (p.has_weights)
        transport::peer_region<float>(ctx, d, ctx.ht.topk_weights)[row * K + lane] =
            here ? w : 0.0f;
    }
    if (lane == 0) transport::peer_region<int32_t>(ctx, d, ctx.ht.src_token)[row] = src_token;
    if (p.has_scales) {
      float* dst = transport::peer_region<float>(ctx, d, ctx.ht.scales) + row * groups;
      if (lane < groups) dst[lane] = scale_lo;
      if (lane + 32 < groups) dst[lane + 32] = scale_hi;
      for (int s = lane + 64; s < groups; s += 32) dst[s] = msg_scales[s];
    }
  }
  // The row, kRowCopyUnroll vectors per lane in flight (the message arrived during this kernel:
  // coherent loads).
  const int n16 = p.out_row_bytes / 16;
  const int4* src = reinterpret_cast<const int4*>(message);
  constexpr int kUnroll = device::kRowCopyUnroll;
  for (int base = 0; base < n16; base += 32 * kUnroll) {  // warp-uniform bound: shuffles below
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < n16) v[u] = device::ld_peer_16(src + i);
    }
    for (uint32_t m = mask; m; m &= m - 1) {
      const int g = __ffs(m) - 1, d = me_node * G + g;
      const int64_t row = __shfl_sync(kFullMask, row_of_lane, g);
      int4* dst = reinterpret_cast<int4*>(ctx.peers[d] + ctx.ht.x + row * p.out_row_bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < n16) device::st_stream_16(dst + i, v[u]);
      }
    }
  }
}

/// Every warp: the messages this rank forwards, spread over all warps (message j of each other
/// node, in order, so that the first chunks are forwarded while later ones are still on the
/// link). A warp waits for the chunk of its message without consuming the signal: many warps
/// share a chunk; consume_forwarded() takes the counts back once every warp is done. False after
/// a failed wait.
__device__ bool forward_all(const DeviceContext& ctx, const DispatchParams& p, rdma::WarpPort& port,
                            int lane) {
  const int N = ctx.num_nodes;
  for (int from = 0; from < N; ++from) {
    if (from == ctx.node) continue;
    const int64_t n = p.handle.fwd_expected[from];
    int seen_chunk = -1;
    for (int64_t j = global_warp(); j < n; j += grid_warps()) {
      const int c = static_cast<int>(j / kChunkTokens);
      if (c != seen_chunk) {
        if (!chunk_arrived(ctx, port, chunk_signal(ctx, ctx.internode.sig_dispatch, from, c),
                           chunk_entries(static_cast<int32_t>(n), c), partner_on(ctx, from), c))
          return false;
        seen_chunk = c;
      }
      forward_message(ctx, p, from, j, lane);
    }
  }
  return true;
}

/// The last block, once every warp has forwarded: takes back the message counts of every chunk
/// (the signals count what is not yet consumed; the next call's messages come after the next
/// count exchange, so none is taken here by mistake).
__device__ void consume_forwarded(const DeviceContext& ctx, const DispatchParams& p) {
  const int N = ctx.num_nodes, chunks = ctx.internode.chunks;
  for (int u = threadIdx.x; u < N * chunks; u += blockDim.x) {
    const int from = u / chunks, c = u % chunks;
    if (from == ctx.node) continue;
    const int n = chunk_entries(p.handle.fwd_expected[from], c);
    if (n > 0)
      rdma::consume_signal(ctx, chunk_signal(ctx, ctx.internode.sig_dispatch, from, c),
                           static_cast<uint64_t>(n));
  }
}

/// Fresh dispatch: the layout steps (without their count exchange), the node bitmaps, then the
/// internode count exchange. False in every thread after a failed wait.
__device__ bool fresh_layout(const DeviceContext& ctx, const DispatchParams& p, uint64_t seq,
                             uint32_t* columns, int lane) {
  bool ok = layout::compute_layout(ctx, p.layout, seq, columns, device::whole_grid());
  build_node_rows(ctx, (p.num_tokens + 31) / 32, lane);
  ok = transport::grid_barrier(ctx, ok, device::whole_grid());
  if (blockIdx.x == 0 && ok) ok = exchange_counts(ctx, p, seq);
  ok = transport::grid_barrier(ctx, ok, device::whole_grid());
  return ok && !transport::aborted(ctx);
}

/// Cached dispatch: no count exchange, so every destination must say it entered the call (the
/// ranks of this node through the flags, the partners through the engine).
__device__ bool cached_arrival(const DeviceContext& ctx, uint64_t seq) {
  bool ok = true;
  if (blockIdx.x == 0) {
    if (threadIdx.x < 32) announce_remote_arrival(ctx);
    ok = node_signal_and_wait(ctx, FlagKind::kArrive, seq, Phase::kArrive, 0);
    ok = await_remote_arrivals(ctx, 0) && ok;
  }
  ok = transport::grid_barrier(ctx, ok, device::whole_grid());
  return ok && !transport::aborted(ctx);
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    dispatch_kernel(const __grid_constant__ DeviceContext ctx, const DispatchParams p) {
  extern __shared__ uint32_t columns[];  // the layout's bitmap columns
  const uint64_t seq = device::read_call_seq(ctx);
  const int lane = threadIdx.x & 31;
  bool ok = p.cached ? cached_arrival(ctx, seq) : fresh_layout(ctx, p, seq, columns, lane);
  device::trace_mark(ctx, seq, TraceMark::kOpened);
  if (p.layout_only) {  // get_layout: every rank has every count; nothing else moves
    if (transport::is_last_block(ctx) && threadIdx.x == 0) {
      device::trace_mark(ctx, seq, TraceMark::kClosed);
      device::close_call(ctx);
    }
    return;
  }

  rdma::WarpPort port(ctx);
  for (int64_t t = global_warp(); ok && t < p.num_tokens; t += grid_warps()) {
    if (!p.cached) record_route(ctx, p, t, lane);
    send_token(ctx, p, t, lane, port);
  }
  // Senders never wait on forwarders, so every message this rank forwards arrives. A warp
  // forwards while the NIC still carries its own messages (their held signals are delivered as
  // they fall due, also while it waits), then flushes.
  if (ok) ok = forward_all(ctx, p, port, lane);
  port.flush();
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    if (!transport::aborted(ctx)) consume_forwarded(ctx, p);
    node_signal_and_wait(ctx, FlagKind::kDispatchDone, seq, Phase::kDispatchDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

}  // namespace

void launch_dispatch(const DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream) {
  const size_t smem = params.cached ? 0 : layout::column_smem_bytes(ctx.num_experts, threads);
  detail::with_register_budget(threads, [&](auto budget) {
    dispatch_kernel<decltype(budget)::value><<<blocks, threads, smem, stream>>>(ctx, params);
  });
  MOECOMM_LAUNCH_CHECK("internode::dispatch_kernel");
}

void preload_dispatch_kernel() {
  detail::for_each_register_budget([](auto budget) {
    detail::preload_kernel(dispatch_kernel<decltype(budget)::value>, layout::kColumnSmemLimit);
  });
}

}  // namespace moecomm::internode
