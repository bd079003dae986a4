// Internode HT combine (internode/internode.hpp): each rank publishes its expert outputs to the
// ranks of its node; as forwarder it sums, for every message it forwarded, the outputs of its
// node's ranks (f32, ascending ranks, rounded to bf16) and puts the partial sum back to the
// message's source; as source it adds, per token, the partial sums of every node it went to in
// ascending node order (its own node's from the outputs directly), then the bias.
#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "internode/internode.hpp"
#include "internode/steps.cuh"
#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"
#include "runtime/register_budget.hpp"

namespace moecomm::internode {

using detail::kMaxBlockThreads;

namespace {

constexpr int kBf16PerVector = 8;  // bf16 channels in 16 bytes

/// The expert outputs (and received weights) of the ranks of this node, by local index.
struct NodeOutputs {
  const uint16_t* const* y;
  const float* const* w;
};

/// Adds one bf16 vector (8 channels) to acc in f32.
__device__ __forceinline__ void add_bf16x8(float (&acc)[kBf16PerVector], const int4& v) {
  float f[kBf16PerVector];
  device::unpack_bf16x8(v, f);
#pragma unroll
  for (int j = 0; j < kBf16PerVector; ++j) acc[j] = __fadd_rn(acc[j], f[j]);
}

/// Where one message's (or token's) rows lie at the ranks of this node: lane g holds the row at
/// local rank g (lo: g < 32, hi: g >= 32; -1: none), so that the rows are read once per message
/// instead of once per vector (the loads of a vector then wait for nothing but each other).
struct NodeRows {
  int32_t lo = -1, hi = -1;
  uint64_t mask = 0;  // bit g: rank g of this node holds a row

  /// Every lane: rows[g] for the node's G ranks (a pointer to G i32).
  __device__ NodeRows(const int32_t* rows, int G, int lane) {
    if (lane < G) lo = rows[lane];
    if (lane + 32 < G) hi = rows[lane + 32];
    mask = static_cast<uint64_t>(__ballot_sync(kFullMask, lo >= 0)) |
           (static_cast<uint64_t>(__ballot_sync(kFullMask, hi >= 0)) << 32);
  }
  /// Every lane (warp-uniform g): the row at rank g.
  __device__ int64_t row(int g) const { return __shfl_sync(kFullMask, g < 32 ? lo : hi, g & 31); }
};

/// Vector i of the f32 sum, over the ranks g of this node ascending that hold a row, of their
/// output rows: the node's partial sum before it is rounded to bf16. Up to kNodeBatch rows are
/// loaded before they are added (in order), so their loads are in flight together. Every lane
/// (warp-uniform: the rows' shuffles); `active` false: nothing is loaded, acc is unspecified.
constexpr int kNodeBatch = 4;  // 8 spilled registers (each row is one 16-byte load)
__device__ __forceinline__ void node_partial(const DeviceContext& ctx, NodeOutputs outs,
                                             const NodeRows& rows, int i, bool active,
                                             float (&acc)[kBf16PerVector]) {
  const int64_t H = ctx.hidden;
#pragma unroll
  for (int j = 0; j < kBf16PerVector; ++j) acc[j] = 0.0f;
  for (uint64_t m = rows.mask; m;) {
    int4 v[kNodeBatch];
    int loaded = 0;
#pragma unroll
    for (int b = 0; b < kNodeBatch; ++b) {
      if (!m) break;  // warp-uniform
      const int g = pop_lowest(m);
      const int64_t row = rows.row(g);
      if (active) v[b] = device::ld_peer_16_any(outs.y[g] + row * H + i * 8);
      loaded = b + 1;
    }
#pragma unroll
    for (int b = 0; b < kNodeBatch; ++b) {
      if (b >= loaded || !active) break;
      add_bf16x8(acc, v[b]);
    }
  }
}

/// Weight k of the node's partial sum (f32, ascending ranks; 0 without published weights).
__device__ __forceinline__ float node_weight(const DeviceContext& ctx, NodeOutputs outs,
                                             const int32_t* rows, int k) {
  float sum = 0.0f;
  for (int g = 0; g < ctx.node_size; ++g)
    if (rows[g] >= 0 && outs.w[g]) sum = __fadd_rn(sum, outs.w[g][rows[g] * ctx.topk + k]);
  return sum;
}

/// Rounds acc to bf16 and back (what crosses the node boundary).
__device__ __forceinline__ void round_bf16(float (&acc)[kBf16PerVector]) {
  device::unpack_bf16x8(device::pack_bf16x8(acc), acc);
}

/// Every warp, as forwarder: the partial sums of the messages this rank forwarded from each other
/// node, spread over all warps (message j in order, so that the first chunks leave first), each
/// staged in the window and put back to its source; the warp goes on while the NIC carries it.
__device__ void send_partials(const DeviceContext& ctx, const CombineParams& p, NodeOutputs outs,
                              rdma::WarpPort& port, int lane) {
  const int N = ctx.num_nodes, G = ctx.node_size, K = ctx.topk;
  const internode::Regions& in = ctx.internode;
  const int n16 = ctx.hidden / kBf16PerVector;
  for (int to = 0; to < N; ++to) {
    if (to == ctx.node) continue;
    const int64_t n = p.handle.fwd_expected[to];
    for (int64_t j = global_warp(); j < n; j += grid_warps()) {
      const int32_t* rows = p.handle.fwd_rows + (static_cast<int64_t>(to) * ctx.max_tokens + j) * G;
      uint8_t* part =
          window_at<uint8_t>(ctx, entry_offset(ctx, in.combine_send, to, j, in.part_bytes));
      const NodeRows route(rows, G, lane);
      for (int base = 0; base < n16; base += 32) {  // warp-uniform: the rows' shuffles
        const int i = base + lane;
        float acc[kBf16PerVector];
        node_partial(ctx, outs, route, i, i < n16, acc);
        if (i < n16) reinterpret_cast<int4*>(part)[i] = device::pack_bf16x8(acc);
      }
      if (lane < K)
        reinterpret_cast<float*>(part + 2 * static_cast<int64_t>(ctx.hidden))[lane] =
            node_weight(ctx, outs, rows, lane);
      port.put_signal_later(partner_on(ctx, to),
                            entry_offset(ctx, in.combine_recv, ctx.node, j, in.part_bytes),
                            entry_offset(ctx, in.combine_send, to, j, in.part_bytes),
                            static_cast<uint64_t>(in.part_bytes),
                            chunk_signal(ctx, in.sig_combine, ctx.node, j / kChunkTokens), 1);
    }
  }
}

/// One warp, as source: waits until the partial sums of token t from every other node it went to
/// have arrived (its chunk there complete), without consuming (consume_partials does, at the
/// end). False after a failed wait.
__device__ bool await_token_partials(const DeviceContext& ctx, const CombineParams& p, int64_t t,
                                     rdma::WarpPort& port) {
  const int N = ctx.num_nodes;
  const int32_t* slots = p.handle.node_slot + t * N;
  for (int b = 0; b < N; ++b) {
    if (b == ctx.node || slots[b] < 0) continue;
    const int c = slots[b] / kChunkTokens;
    if (!chunk_arrived(ctx, port, chunk_signal(ctx, ctx.internode.sig_combine, b, c),
                       chunk_entries(p.handle.send_per_node[b], c), partner_on(ctx, b), c))
      return false;
  }
  return true;
}

/// The last block, once every token is reduced: takes back the counts of every chunk of partial
/// sums this rank received.
__device__ void consume_partials(const DeviceContext& ctx, const CombineParams& p) {
  const int N = ctx.num_nodes, chunks = ctx.internode.chunks;
  for (int u = threadIdx.x; u < N * chunks; u += blockDim.x) {
    const int from = u / chunks, c = u % chunks;
    if (from == ctx.node) continue;
    const int n = chunk_entries(p.handle.send_per_node[from], c);
    if (n > 0)
      rdma::consume_signal(ctx, chunk_signal(ctx, ctx.internode.sig_combine, from, c),
                           static_cast<uint64_t>(n));
  }
}

/// One warp: out[t] = bf16(sum over the nodes token t went to, ascending, of their bf16 partial
/// sums, + bias); combined weights likewise in f32 without rounding. The first partial sum that
/// came back from another node is loaded together with this node's rows, so that with two nodes
/// every load of a vector is in flight at once; the sum's order is unchanged. One code path for
/// every node count keeps the kernel within its registers (a second path spilled).
__device__ void reduce_token(const DeviceContext& ctx, const CombineParams& p, NodeOutputs outs,
                             int64_t t, int lane) {
  const int N = ctx.num_nodes, G = ctx.node_size, K = ctx.topk, H = ctx.hidden;
  const internode::Regions& in = ctx.internode;
  const int32_t* local_rows = p.send_row + t * ctx.num_ranks + ctx.node * G;
  const int32_t* slots = p.handle.node_slot + t * N;
  const NodeRows route(local_rows, G, lane);
  const bool local_any = route.mask != 0;
  // The other nodes that sent a partial sum, ascending (bit b).
  const int32_t slot_lo = lane < N ? slots[lane] : -1;
  const int32_t slot_hi = lane + 32 < N ? slots[lane + 32] : -1;
  const uint64_t remote = (static_cast<uint64_t>(__ballot_sync(kFullMask, slot_lo >= 0)) |
                           (static_cast<uint64_t>(__ballot_sync(kFullMask, slot_hi >= 0)) << 32)) &
                          ~(1ull << ctx.node);
  auto partial_of = [&](int b) {  // every lane (warp-uniform b)
    const int32_t slot = __shfl_sync(kFullMask, b < 32 ? slot_lo : slot_hi, b & 31);
    return window_at<uint8_t>(ctx, entry_offset(ctx, in.combine_recv, b, slot, in.part_bytes));
  };
  const int first_remote = remote ? __ffsll(static_cast<long long>(remote)) - 1 : -1;
  const int4* first_at =
      first_remote >= 0 ? reinterpret_cast<const int4*>(partial_of(first_remote)) : nullptr;
  const int n16 = H / kBf16PerVector;
  for (int base = 0; base < n16; base += 32) {  // warp-uniform: the shuffles
    const int i = base + lane;
    const bool active = i < n16;
    int4 first_v = make_int4(0, 0, 0, 0);
    if (first_at && active) first_v = device::ld_peer_16(first_at + i);
    float own[kBf16PerVector];
    if (local_any) {
      node_partial(ctx, outs, route, i, active, own);
      round_bf16(own);
    }
    float acc[kBf16PerVector] = {};
    for (int b = 0; b < N; ++b) {  // warp-uniform
      if (b == ctx.node) {
        if (!local_any) continue;
#pragma unroll
        for (int j = 0; j < kBf16PerVector; ++j) acc[j] = __fadd_rn(acc[j], own[j]);
      } else if ((remote >> b) & 1ull) {
        int4 v = first_v;
        if (b != first_remote) {
          const int4* at = reinterpret_cast<const int4*>(partial_of(b));
          if (active) v = device::ld_peer_16(at + i);
        }
        if (active) add_bf16x8(acc, v);
      }
    }
    if (!active) continue;
    if (p.bias)
      add_bf16x8(acc, *reinterpret_cast<const int4*>(p.bias + t * H + i * kBf16PerVector));
    *reinterpret_cast<int4*>(p.out + t * H + i * kBf16PerVector) = device::pack_bf16x8(acc);
  }
  if (p.combined_weights) {
    float sum = 0.0f;
    for (int b = 0; b < N; ++b) {  // warp-uniform: partial_of shuffles
      if (b == ctx.node) {
        if (local_any && lane < K) sum = __fadd_rn(sum, node_weight(ctx, outs, local_rows, lane));
      } else if ((remote >> b) & 1ull) {
        const volatile float* w = reinterpret_cast<const float*>(partial_of(b) + 2 * H);
        if (lane < K) sum = __fadd_rn(sum, w[lane]);
      }
    }
    if (lane < K) p.combined_weights[t * K + lane] = sum;
  }
}

/// Every block: publishes this rank's outputs to the ranks of its node (block 0) and learns
/// theirs. False after a failed wait.
__device__ bool exchange_outputs(const DeviceContext& ctx, const CombineParams& p, uint64_t seq,
                                 const uint16_t** y_of, const float** w_of) {
  const int R = ctx.num_ranks, G = ctx.node_size, first = ctx.node * G, me = ctx.rank;
  const int parity = static_cast<int>(seq & 1);
  if (blockIdx.x == 0) {
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      uint64_t* slot = transport::peer_region<uint64_t>(ctx, first + g, ctx.ht.peer_ptrs) +
                       (parity * R + me) * detail::kPeerPtrs;
      slot[0] = p.y;
      slot[1] = p.recv_weights;
      transport::scope(ctx).fence();  // y (written by earlier kernels) and its address
      transport::signal(ctx, first + g, FlagKind::kCombineReady, seq);
    }
  }
  bool ok = true;
  for (int g = threadIdx.x; g < G; g += blockDim.x) {
    const int d = first + g;
    if (!transport::wait_signal(ctx, FlagKind::kCombineReady, d, seq, Phase::kCombineReady,
                                blockIdx.x)) {
      ok = false;
      continue;
    }
    const uint64_t* slot = transport::peer_region<uint64_t>(ctx, me, ctx.ht.peer_ptrs) +
                           (parity * R + d) * detail::kPeerPtrs;
    y_of[g] = static_cast<const uint16_t*>(transport::resolve_address(ctx, d, slot[0]));
    w_of[g] =
        slot[1] ? static_cast<const float*>(transport::resolve_address(ctx, d, slot[1])) : nullptr;
  }
  return __syncthreads_and(ok) != 0;
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    combine_kernel(const __grid_constant__ DeviceContext ctx, const CombineParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int lane = threadIdx.x & 31;
  __shared__ const uint16_t* y_of[detail::kMaxRanks];
  __shared__ const float* w_of[detail::kMaxRanks];
  const NodeOutputs outs{y_of, w_of};

  // This rank's combine_recv is free (its previous combine is over): tell the partners.
  if (blockIdx.x == 0 && threadIdx.x < 32) announce_remote_arrival(ctx);
  bool ok = exchange_outputs(ctx, p, seq, y_of, w_of);
  if (blockIdx.x == 0) ok = await_remote_arrivals(ctx, 0) && ok;
  ok = transport::grid_barrier(ctx, ok, device::whole_grid()) && !transport::aborted(ctx);
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  // Forwarders never wait before they send, so every partial sum a source awaits arrives; a
  // token is reduced as soon as its partial sums are in (while the NIC still carries this warp's
  // own: their held signals are delivered as they fall due).
  rdma::WarpPort port(ctx);
  if (ok) send_partials(ctx, p, outs, port, lane);
  for (int64_t t = global_warp(); ok && t < p.num_tokens; t += grid_warps()) {
    ok = await_token_partials(ctx, p, t, port);
    if (ok) reduce_token(ctx, p, outs, t, lane);
  }
  port.flush();  // the held signals of this warp's partial sums
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    if (!transport::aborted(ctx)) consume_partials(ctx, p);
    // The ranks of this node have read this rank's outputs (the caller may overwrite y as soon
    // as combine returns on its stream).
    node_signal_and_wait(ctx, FlagKind::kCombineDone, seq, Phase::kCombineDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

}  // namespace

void launch_combine(const DeviceContext& ctx, const CombineParams& params, int blocks, int threads,
                    cudaStream_t stream) {
  detail::with_register_budget(threads, [&](auto budget) {
    combine_kernel<decltype(budget)::value><<<blocks, threads, 0, stream>>>(ctx, params);
  });
  MOECOMM_LAUNCH_CHECK("internode::combine_kernel");
}

void preload_dispatch_kernel();  // dispatch.cu

void preload_kernels() {
  preload_dispatch_kernel();
  detail::for_each_register_budget(
      [](auto budget) { detail::preload_kernel(combine_kernel<decltype(budget)::value>); });
}

}  // namespace moecomm::internode
