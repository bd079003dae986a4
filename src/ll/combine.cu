// Low-latency combine (ll/ll.hpp): the send phase (publish y to the ranks of this node, push
// the rows bound for other nodes through the RDMA engine), the receive phase (each token's
// weighted sum in k order), and the one-launch group form.
#include "ll/steps.cuh"

namespace moecomm::ll {

namespace {

/// One block: tells every peer where this rank's expert outputs y are, for call `seq`
/// (kInternode: the peers of this node; the others get their rows pushed, push_rows).
template <bool kInternode>
__device__ void publish_outputs(const DeviceContext& ctx, int buffer, uint64_t y, uint64_t seq) {
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t masked = transport::masked_peers(ctx);
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if ((masked >> d) & 1ull) continue;
    if constexpr (kInternode)
      if (!same_node(ctx, d)) continue;
    uint64_t* slot = transport::peer_region<uint64_t>(ctx, d, ctx.ll.peer_ptrs) +
                     (buffer * R + me) * detail::kPeerPtrs;
    slot[0] = y;
    transport::scope(ctx).fence();  // y (written by earlier kernels) and its address
    transport::signal(ctx, d, FlagKind::kCombineReady, seq);
  }
}

/// Internode combine send, every block of the rank: puts each row of y that a source on another
/// node will read into that source's combine_recv[b] ([rank among those off its node][le]
/// [position]). A put starts in this rank's window: y is used in place when it lies there (the
/// zero-copy combine_buffer), else each row is first copied to its slot of combine[b] (only the
/// rows bound for other nodes). The slots' counts are those of the dispatch's receive phase.
/// Only the rows that exist are visited: they are numbered in (le, source, position) order and
/// dealt round robin to every warp of the rank's blocks (a warp finds its rows by a warp-wide scan
/// of the counts, 32 (le, source) pairs at a time), so the few hundred rows of a call spread over
/// all warps instead of falling, position by position, on the few warps whose index matches a
/// small position. Flushes the warp's port.
__device__ void push_rows(const DeviceContext& ctx, int b, uint64_t y, device::RankBlocks blocks,
                          rdma::WarpPort& port) {
  const int R = ctx.num_ranks, L = ctx.local_experts, M = ctx.ll.capacity, G = ctx.node_size;
  const uint64_t row = static_cast<uint64_t>(ctx.hidden) * 2;
  const int64_t items = static_cast<int64_t>(L) * R * M;  // y's slots: le, source, position
  const uint64_t y_off = y & ~detail::kSymmetricOffsetTag;
  const bool in_window = (y & detail::kSymmetricOffsetTag) && y_off % 16 == 0 &&
                         y_off + static_cast<uint64_t>(items) * row <= ctx.rdma.window_bytes;
  const uint8_t* y_local =
      static_cast<const uint8_t*>(transport::resolve_address(ctx, ctx.rank, y));
  const int32_t* layout = ctx.ll.recv_layout + static_cast<size_t>(b) * L * R * 2;
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  const int lane = threadIdx.x % kWarpLanes;
  const int pairs = L * R;  // (le, source) pairs, le-major: pair = le * R + source
  const int64_t stride = static_cast<int64_t>(blocks.count) * warps;
  int64_t next = static_cast<int64_t>(blocks.index) * warps + warp;  // this warp's next row
  int64_t before = 0;  // rows of the pairs before this group of 32
  for (int c0 = 0; c0 < pairs; c0 += kWarpLanes) {
    const int mine = c0 + lane;
    int32_t n = 0;
    if (mine < pairs && !same_node(ctx, mine % R)) n = layout[2 * mine + 1];
    int32_t incl = n;  // inclusive prefix over the group's lanes
#pragma unroll
    for (int off = 1; off < kWarpLanes; off <<= 1) {
      const int32_t v = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += v;
    }
    const int32_t total = __shfl_sync(kFullMask, incl, kWarpLanes - 1);
    for (; next < before + total; next += stride) {  // warp-uniform
      const int32_t r = static_cast<int32_t>(next - before);
      const int owner = __ffs(__ballot_sync(kFullMask, incl > r)) - 1;
      const int32_t first = __shfl_sync(kFullMask, incl - n, owner);
      const int pair = c0 + owner, le = pair / R, s = pair % R, pos = r - first;
      const int64_t i = static_cast<int64_t>(pair) * M + pos;  // y's slot
      uint64_t from_off = y_off + static_cast<uint64_t>(i) * row;
      if (!in_window) {  // the row to its staging slot, kRowCopyUnroll vectors per lane in flight
        from_off = ctx.ll.combine[b] + static_cast<uint64_t>(i) * row;
        const uint8_t* src = y_local + static_cast<uint64_t>(i) * row;
        int4* dst = transport::peer_region<int4>(ctx, ctx.rank, from_off);
        const int n16 = static_cast<int>(row / 16);
        constexpr int kUnroll = device::kRowCopyUnroll;
        for (int v0 = 0; v0 < n16; v0 += kWarpLanes * kUnroll) {
          int4 v[kUnroll];
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int k = v0 + u * kWarpLanes + lane;
            if (k < n16) v[u] = device::ld_peer_16_any(src + static_cast<uint64_t>(k) * 16);
          }
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int k = v0 + u * kWarpLanes + lane;
            if (k < n16) dst[k] = v[u];
          }
        }
      }
      const int from = remote_index(ctx.rank, s / G, G);
      port.put(s, ctx.ll.combine_recv[b] + ((static_cast<uint64_t>(from) * L + le) * M + pos) * row,
               from_off, row);
    }
    before += total;
  }
  port.flush();
}

/// One block (after every block's push_rows): one signal per (buffer, this rank) to every rank
/// of another node.
__device__ void signal_rows_pushed(const DeviceContext& ctx, int b, rdma::WarpPort& port) {
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  for (int d = warp; d < ctx.num_ranks; d += warps)
    if (!same_node(ctx, d)) port.signal(d, signal_at(ctx, ctx.ll.sig_combine, b, ctx.rank), 1);
}

template <bool kInternode>
__global__ void __launch_bounds__(kInternode ? kMaxBlockThreads : kCombineSendThreads)
    combine_send_kernel(const __grid_constant__ DeviceContext ctx, const CombineSendParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) ctx.ll.combine_seq[p.buffer] = seq;
    publish_outputs<kInternode>(ctx, p.buffer, p.y, seq);
  }
  if constexpr (kInternode) {
    rdma::WarpPort port(ctx);
    push_rows(ctx, p.buffer, p.y, device::whole_grid(), port);
    if (transport::is_last_block(ctx)) {
      if (!transport::aborted(ctx)) signal_rows_pushed(ctx, p.buffer, port);
      __syncthreads();
      if (threadIdx.x == 0) device::close_call(ctx);
    }
  } else {
    if (threadIdx.x == 0) device::close_call(ctx);  // every thread read seq in read_call_seq
  }
}

/// kInternode end of a combine (the rank's last block): takes back the remote rows' signals,
/// tells every peer this rank has read what it needed (same node: the kCombineDone flag; other
/// nodes: a counter signal) and waits for every peer to say the same.
__device__ bool finish_combine_internode(const DeviceContext& ctx, int b, uint64_t seq, int channel,
                                         rdma::WarpPort& port) {
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t masked = transport::masked_peers(ctx);
  const bool fine = !transport::aborted(ctx);
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (fine && !same_node(ctx, d))
      rdma::consume_signal(ctx, signal_at(ctx, ctx.ll.sig_combine, b, d), 1);
  if (threadIdx.x < R) transport::scope(ctx).fence();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (same_node(ctx, d) && !((masked >> d) & 1ull))
      transport::signal(ctx, d, FlagKind::kCombineDone, seq);
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  for (int d = warp; d < R; d += warps)
    if (!same_node(ctx, d)) port.signal(d, signal_at(ctx, ctx.ll.sig_done, b, me), 1);
  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (same_node(ctx, d)) {
      ok = transport::wait_signal(ctx, FlagKind::kCombineDone, d, seq, Phase::kCombineDone,
                                  channel) &&
           ok;
    } else {
      const uint64_t sig = signal_at(ctx, ctx.ll.sig_done, b, d);
      if (rdma::wait_signal(ctx, sig, 1, d, Phase::kCombineDone, channel))
        rdma::consume_signal(ctx, sig, 1);
      else
        ok = false;
    }
  }
  return __syncthreads_and(ok) != 0;
}

/// Token t's choice at lane k < K: its slot (-1: none) and weight. Local inputs, written before
/// the kernel, so they may be loaded ahead of the opening round.
struct Choice {
  int32_t slot = -1;
  float weight = 0.0f;
};

__device__ __forceinline__ Choice load_choice(const CombineRecvParams& p, int64_t t, int K,
                                              int lane) {
  Choice c;
  if (t >= 0 && lane < K) {
    c.slot = p.slot_of[t * K + lane];
    c.weight = p.topk_weights ? p.topk_weights[t * K + lane] : 1.0f;
  }
  return c;
}

/// The receive phase of combine for one rank, run by `blocks` (with publish_y, the send phase
/// first). kInternode: the rows of experts on other nodes are read from this rank's
/// combine_recv[b], where they were pushed (every block waits for each pusher's signal).
/// kOneLaunch: one kernel for the whole group (`all`: every rank's parameters), after every
/// rank's expert kernels on the same stream. Every y is then complete before the kernel starts
/// and stays until it ends, so there is no round at all: no outputs published or waited for (the
/// addresses are in `all`), no done barrier; y is read through the non-coherent path.
template <bool kInternode, bool kOneLaunch = false>
__device__ void combine_recv(const DeviceContext& ctx, const CombineRecvParams& p,
                             device::RankBlocks blocks, const CombineRecvParams* all = nullptr) {
  static_assert(!(kInternode && kOneLaunch), "a one-launch group has one node");
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden, me = ctx.rank, b = p.buffer;
  const int32_t slots_per_rank = ctx.local_experts * R * ctx.ll.capacity;
  // Without a hook the send phase is this kernel's first step; with one it ran in its own kernel.
  const uint64_t seq = p.publish_y ? device::read_call_seq(ctx) : ctx.ll.combine_seq[b];
  if (!kOneLaunch && p.publish_y && blocks.index == 0)
    publish_outputs<kInternode>(ctx, b, p.y, seq);
  const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
  rdma::WarpPort port(ctx);  // kInternode only
  bool pushed = true;
  if constexpr (kInternode) {
    if (p.publish_y) {  // the send phase: every block pushes, then one block signals
      push_rows(ctx, b, p.y, blocks, port);
      pushed = transport::grid_barrier(ctx, true, blocks);
      if (pushed && blocks.index == 0) signal_rows_pushed(ctx, b, port);
    }
  }
  __shared__ const uint16_t* y_of[detail::kMaxRanks];
  // Per warp: the token's valid (slot row, weight) pairs, compacted in k order.
  __shared__ const uint16_t* rows[kMaxWarps][detail::kMaxTopk];
  __shared__ float weights[kMaxWarps][detail::kMaxTopk];

  const int warps = blockDim.x / kWarpLanes;
  const int64_t stride = static_cast<int64_t>(blocks.count) * warps;
  // One warp per piece of a token's output row (one lane step of vectors at least); the last
  // unit is partial when H is not a multiple of 128 (c_end below stops at H).
  const RowPieces pieces(p.num_tokens, stride, (H + kUnitChannels - 1) / kUnitChannels,
                         kCombineStepUnits);
  int64_t i = static_cast<int64_t>(blocks.index) * warps + warp;
  // The warp's next item's choices, loaded one item ahead (the first before the opening round).
  Choice next = load_choice(p, i < pieces.items ? i / pieces.count : -1, K, lane);

  bool ok = pushed;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if constexpr (kOneLaunch) {  // a masked rank's experts contribute nothing
      y_of[d] = transport::is_masked(ctx, d)
                    ? nullptr
                    : static_cast<const uint16_t*>(transport::resolve_address(ctx, d, all[d].y));
      continue;
    }
    if constexpr (kInternode) {
      if (!same_node(ctx, d)) {
        if (!rdma::wait_signal(ctx, signal_at(ctx, ctx.ll.sig_combine, b, d), 1, d,
                               Phase::kRdmaData, blocks.index)) {
          ok = false;
          continue;
        }
        const int64_t from = remote_index(d, ctx.node, ctx.node_size);
        y_of[d] = transport::peer_region<const uint16_t>(ctx, me, ctx.ll.combine_recv[b]) +
                  from * ctx.local_experts * ctx.ll.capacity * H;
        continue;
      }
    }
    if (!transport::wait_signal(ctx, FlagKind::kCombineReady, d, seq, Phase::kCombineReady,
                                blocks.index)) {
      ok = false;
      continue;
    }
    if (transport::is_masked(ctx, d)) {  // its experts' outputs contribute nothing
      y_of[d] = nullptr;
      continue;
    }
    const uint64_t* slot = transport::peer_region<uint64_t>(ctx, me, ctx.ll.peer_ptrs) +
                           (b * R + d) * detail::kPeerPtrs;
    y_of[d] = static_cast<const uint16_t*>(transport::resolve_address(ctx, d, slot[0]));
  }
  ok = __syncthreads_and(ok) != 0;
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  for (; ok && i < pieces.items; i += stride) {
    const int64_t t = i / pieces.count;
    const int piece = static_cast<int>(i % pieces.count);
    const Choice mine = next;
    next = load_choice(p, i + stride < pieces.items ? (i + stride) / pieces.count : -1, K, lane);
    const uint16_t* row = nullptr;
    float w = 0.0f;
    if (lane < K) {
      const int32_t sl = mine.slot;
      const uint16_t* y = sl >= 0 ? y_of[sl / slots_per_rank] : nullptr;
      if (y) {
        int64_t at = sl % slots_per_rank;
        if constexpr (kInternode) {
          // combine_recv holds [le][position]: le = at / (R*M), position = at % M.
          const int M = ctx.ll.capacity;
          if (!same_node(ctx, sl / slots_per_rank))
            at = at / (static_cast<int64_t>(R) * M) * M + at % M;
        }
        row = y + at * H;
        w = mine.weight;
      }
    }
    const unsigned valid = __ballot_sync(kFullMask, row != nullptr);
    const int n = __popc(valid);
    if (row) {
      const int at = __popc(valid & device::lanemask_lt());
      rows[warp][at] = row;
      weights[warp][at] = w;
    }
    __syncwarp();
    const int c_end = min(H, (piece + 1) * pieces.units * kUnitChannels) / kBf16PerVec;
    for (int c = piece * pieces.units * kVectorsPerUnit + lane; c < c_end; c += kWarpLanes) {
      float acc[kBf16PerVec] = {};
      for (int k0 = 0; k0 < n; k0 += kCombineBatch) {
        int4 v[kCombineBatch];
#pragma unroll
        for (int u = 0; u < kCombineBatch; ++u)
          if (k0 + u < n) {
            const uint16_t* at = rows[warp][k0 + u] + c * kBf16PerVec;
            v[u] = kOneLaunch ? device::ld_stream_16_any(at) : device::ld_peer_16_any(at);
          }
#pragma unroll
        for (int u = 0; u < kCombineBatch; ++u) {
          if (k0 + u >= n) break;
          float f[kBf16PerVec];
          device::unpack_bf16x8(v[u], f);
          const float wk = weights[warp][k0 + u];
#pragma unroll
          for (int j = 0; j < kBf16PerVec; ++j) acc[j] = __fmaf_rn(wk, f[j], acc[j]);
        }
      }
      *reinterpret_cast<int4*>(p.out + t * H + c * kBf16PerVec) = device::pack_bf16x8(acc);
    }
    __syncwarp();  // the lists are rewritten for the next piece
  }
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx, blocks)) {
    // Every owner learns its y has been read; y of this rank stays until every reader is done.
    if constexpr (kInternode)
      finish_combine_internode(ctx, b, seq, blocks.index, port);
    else if constexpr (!kOneLaunch)
      transport::signal_and_wait_all(ctx, FlagKind::kCombineDone, seq, Phase::kCombineDone,
                                     blocks.index);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (p.publish_y && threadIdx.x == 0) device::close_call(ctx);
  }
}

template <bool kInternode, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    combine_recv_kernel(const __grid_constant__ DeviceContext ctx, const CombineRecvParams p) {
  combine_recv<kInternode>(ctx, p, device::whole_grid());
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    group_combine_recv_kernel(const __grid_constant__ GroupCombineRecv g) {
  const int r = group_rank(g.launch);
  combine_recv<false, true>(g.ctx[r], g.params[r], group_blocks(g.launch), g.params);
}

}  // namespace

void launch_combine_send(const DeviceContext& ctx, const CombineSendParams& params, int blocks,
                         int threads, cudaStream_t stream) {
  if (ctx.num_nodes > 1) {  // the rows for other nodes are pushed by the whole grid
    check_grid(blocks, threads, "ll::combine_send_kernel");
    combine_send_kernel<true><<<blocks, threads, 0, stream>>>(ctx, params);
  } else {
    combine_send_kernel<false><<<1, kCombineSendThreads, 0, stream>>>(ctx, params);
  }
  MOECOMM_LAUNCH_CHECK("ll::combine_send_kernel");
}

void launch_combine_recv(const DeviceContext& ctx, const CombineRecvParams& params, int blocks,
                         int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::combine_recv_kernel");
  detail::with_register_budget(threads, [&](auto budget) {
    constexpr int kThreads = decltype(budget)::value;
    if (ctx.num_nodes > 1)
      combine_recv_kernel<true, kThreads><<<blocks, threads, 0, stream>>>(ctx, params);
    else
      combine_recv_kernel<false, kThreads><<<blocks, threads, 0, stream>>>(ctx, params);
  });
  MOECOMM_LAUNCH_CHECK("ll::combine_recv_kernel");
}

void launch_group_combine(const GroupCombineRecv& group, int threads, cudaStream_t stream) {
  const int blocks = group.launch.ranks * group.launch.blocks_per_rank;
  check_grid(blocks, threads, "ll::group_combine_recv_kernel");
  detail::with_register_budget(threads, [&](auto budget) {
    group_combine_recv_kernel<decltype(budget)::value><<<blocks, threads, 0, stream>>>(group);
  });
  MOECOMM_LAUNCH_CHECK("ll::group_combine_recv_kernel");
}

void preload_dispatch_kernels();  // ll/dispatch.cu

void preload_combine_kernels() {
  detail::preload_kernel(combine_send_kernel<false>);
  detail::preload_kernel(combine_send_kernel<true>);
  detail::for_each_register_budget([](auto budget) {
    constexpr int kThreads = decltype(budget)::value;
    detail::preload_kernel(combine_recv_kernel<false, kThreads>);
    detail::preload_kernel(combine_recv_kernel<true, kThreads>);
    detail::preload_kernel(group_combine_recv_kernel<kThreads>);
  });
}

void preload_kernels() {
  preload_dispatch_kernels();
  preload_combine_kernels();
}

}  // namespace moecomm::ll
