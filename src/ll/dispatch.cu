// Low-latency dispatch (ll/ll.hpp): the send phase (the layout steps, then one message per
// (token, expert): stores to the ranks of this node, puts through the RDMA engine to the others,
// then the counts), the receive phase, and the one-launch group form.
#include <algorithm>
#include <memory>

#include "ll/steps.cuh"

namespace moecomm::ll {

namespace {

template <bool kInternode>
__device__ void receive_counts(const DeviceContext& ctx, const DispatchRecvParams& p, uint64_t seq);

/// Block 0: tells every peer that this rank entered call seq (transport::announce_arrival; with
/// kInternode, a counter signal through the engine to the ranks of other nodes).
template <bool kInternode>
__device__ void announce(const DeviceContext& ctx, uint64_t seq, device::RankBlocks blocks,
                         rdma::WarpPort& port) {
  if constexpr (!kInternode) {
    transport::announce_arrival(ctx, seq, blocks);
  } else if (blocks.index == 0) {
    const int R = ctx.num_ranks;
    const uint64_t masked = transport::masked_peers(ctx);
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      if (same_node(ctx, d) && !((masked >> d) & 1ull))
        transport::signal(ctx, d, FlagKind::kArrive, seq);
    const int warp = threadIdx.x / kWarpLanes, warps = blockDim.x / kWarpLanes;
    for (int d = warp; d < R; d += warps)
      if (!same_node(ctx, d))
        port.signal(d, ctx.ll.sig_arrive + static_cast<uint64_t>(ctx.rank) * sizeof(uint64_t), 1);
  }
}

/// Every block: waits until every peer entered call seq. kInternode: a remote peer's arrival
/// counter is waited for by every block and consumed once, by the rank's last block
/// (after its count signals): a peer runs at most one dispatch ahead, which leaves its count at 2.
template <bool kInternode>
__device__ bool await_peers(const DeviceContext& ctx, uint64_t seq, device::RankBlocks blocks) {
  if constexpr (!kInternode) {
    return transport::await_arrivals(ctx, seq, blocks);
  } else {
    bool ok = true;
    for (int d = threadIdx.x; d < ctx.num_ranks; d += blockDim.x) {
      ok = (same_node(ctx, d) ? transport::wait_signal(ctx, FlagKind::kArrive, d, seq,
                                                       Phase::kArrive, blocks.index)
                              : rdma::wait_signal(ctx, ctx.ll.sig_arrive + d * sizeof(uint64_t), 1,
                                                  d, Phase::kRdmaArrive, blocks.index)) &&
           ok;
    }
    return __syncthreads_and(ok) != 0;
  }
}

/// The send phase of one rank, run by `blocks` (with `receive`, the receive phase too).
/// kOneLaunch: one kernel for the whole group, after every rank's earlier work on the same
/// stream; every peer's buffers are then free when it starts, so no rank waits for the others'
/// arrival.
template <bool kInternode, int kLoadSteps, bool kOneLaunch = false>
__device__ void dispatch_send(const DeviceContext& ctx, const DispatchSendParams& p,
                              device::RankBlocks blocks, uint32_t* columns) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int L = ctx.local_experts, E = ctx.num_experts, H = ctx.hidden, me = ctx.rank;
  const int b = p.buffer;
  const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
  __shared__ Destination dst[kMaxWarps][detail::kMaxTopk];
  if (blocks.index == 0 && threadIdx.x == 0) ctx.ll.dispatch_seq[b] = seq;
  rdma::WarpPort port(ctx);  // kInternode only
  // kInternode: this rank's rows bound for other nodes are staged here (row t at t * 2H bytes;
  // fp8: H bytes of e4m3, then the f32 scales), then put from here.
  const uint64_t stage_row = static_cast<uint64_t>(H) * 2;

  // Arrive first, wait after the layout: the peers' arrival overlaps this rank's layout steps.
  if (!kOneLaunch) announce<kInternode>(ctx, seq, blocks, port);
  layout::ExpertBitmaps bitmaps;
  const bool laid_out =
      layout::compute_expert_bitmaps(ctx, p.layout, seq, columns, blocks, bitmaps);
  // (The one-launch form still makes `ok` uniform over the block: the loop below has shuffles.)
  const bool ok = kOneLaunch ? __syncthreads_and(laid_out) != 0
                             : await_peers<kInternode>(ctx, seq, blocks) && laid_out;
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  const int warps = blockDim.x / kWarpLanes;
  const int64_t stride = static_cast<int64_t>(blocks.count) * warps;
  // Units of 128 channels, the last one partial when H is not a multiple of 128 (bf16 only: fp8
  // needs whole scale groups, which the config enforces).
  const int row_units = (H + kUnitChannels - 1) / kUnitChannels;
  const int row_vectors = H / kBf16PerVec;
  const RowPieces pieces(p.num_tokens, stride, row_units,
                         p.fp8 ? kQuantizeStepUnits : kCopyStepUnits);
  // Tokens bound for masked ranks are dropped (their slot_of is -1: combine adds nothing).
  const uint64_t masked = transport::masked_peers(ctx);
  // One warp per piece of a token's row: the piece is read (and quantised) once and written to
  // every destination of the token. T <= M (checked by the host), so every slot exists.
  for (int64_t i = static_cast<int64_t>(blocks.index) * warps + warp; ok && i < pieces.items;
       i += stride) {
    const int64_t t = i / pieces.count;
    const int piece = static_cast<int>(i % pieces.count);
    int remote = 0;
    const int n = token_destinations<kInternode>(ctx, p, bitmaps, t, piece == 0, lane, masked,
                                                 dst[warp], port, remote);
    const int u0 = piece * pieces.units;
    const int units = min(pieces.units, row_units - u0);
    const int4* src = reinterpret_cast<const int4*>(p.x + t * H) + u0 * kVectorsPerUnit;
    uint8_t* staged = nullptr;  // kInternode with a destination on another node: the staged row
    if constexpr (kInternode)
      if (remote > 0)
        staged = transport::peer_region<uint8_t>(ctx, me, ctx.ll.stage) + t * stage_row;
    if (p.fp8) {
      device::quantize_groups<kLoadSteps>(
          src, units, p.pow2_scales, lane, [&](int g, int sub, uint4 q, float scale, bool valid) {
            if (!valid) return;
            const int unit = u0 + g;
            for (int k = 0; k < n; ++k) {
              const Destination& to = dst[warp][k];
              if constexpr (kInternode)
                if (to.peer >= 0) continue;
              *reinterpret_cast<uint4*>(to.x + unit * kFp8Group + sub * device::kChannelsPerLane) =
                  q;
              if (sub == 0) to.scales[unit] = scale;
            }
            if constexpr (kInternode) {
              if (staged) {
                *reinterpret_cast<uint4*>(staged + unit * kFp8Group +
                                          sub * device::kChannelsPerLane) = q;
                if (sub == 0) reinterpret_cast<float*>(staged + H)[unit] = scale;
              }
            }
          });
    } else {
      const int vectors = min(units * kVectorsPerUnit, row_vectors - u0 * kVectorsPerUnit);
      device::copy_vectors(
          src, vectors, lane, [&](int base, const int4(&v)[device::kRowCopyUnroll]) {
            for (int k = 0; k < n; ++k) {
              if constexpr (kInternode)
                if (dst[warp][k].peer >= 0) continue;
              int4* to = reinterpret_cast<int4*>(dst[warp][k].x) + u0 * kVectorsPerUnit;
#pragma unroll
              for (int u = 0; u < device::kRowCopyUnroll; ++u) {
                const int v16 = base + u * kWarpLanes + lane;
                if (v16 < vectors) to[v16] = v[u];
              }
            }
            if constexpr (kInternode) {
              if (staged) {
                int4* to = reinterpret_cast<int4*>(staged) + u0 * kVectorsPerUnit;
#pragma unroll
                for (int u = 0; u < device::kRowCopyUnroll; ++u) {
                  const int v16 = base + u * kWarpLanes + lane;
                  if (v16 < vectors) to[v16] = v[u];
                }
              }
            }
          });
      if constexpr (kInternode) {
        if (staged) {  // the piece, from the staged row to each remote slot
          const uint64_t from = ctx.ll.stage + t * stage_row + u0 * kUnitChannels * 2;
          for (int k = 0; k < n; ++k) {
            const Destination& to = dst[warp][k];
            if (to.peer < 0) continue;
            port.put(to.peer, ctx.ll.x[b] + to.slot * stage_row + u0 * kUnitChannels * 2, from,
                     static_cast<uint64_t>(vectors) * 16);
          }
        }
      }
    }
    if constexpr (kInternode) {
      if (staged && p.fp8) {  // the piece's e4m3 bytes, then its scales through the meta words
        __syncwarp();         // every lane's staged bytes and scales
        const uint64_t from = ctx.ll.stage + t * stage_row + u0 * kFp8Group;
        const volatile uint32_t* scales = reinterpret_cast<const uint32_t*>(staged + H) + u0;
        // The piece's scales, read once into registers (lane j: unit u0 + j, and u0 + 32 + j):
        // a load per (destination, unit) would put a dependent load before every put_value.
        const uint32_t scale_lo = lane < units ? scales[lane] : 0u;
        const uint32_t scale_hi = lane + kWarpLanes < units ? scales[lane + kWarpLanes] : 0u;
        for (int k = 0; k < n; ++k) {
          const Destination& to = dst[warp][k];
          if (to.peer < 0) continue;
          port.put(to.peer, ctx.ll.x[b] + to.slot * H + u0 * kFp8Group, from,
                   static_cast<uint64_t>(units) * kFp8Group);
          const uint64_t meta = ctx.ll.meta[b] + static_cast<uint64_t>(to.slot) *
                                                     ctx.ll.meta_words * sizeof(uint64_t);
          for (int u = 0; u < units; ++u) {  // warp-uniform: the shuffle
            const uint32_t scale =
                __shfl_sync(kFullMask, u < kWarpLanes ? scale_lo : scale_hi, u % kWarpLanes);
            if (u < 2 * kWarpLanes)
              port.put_value(to.peer, meta + (1 + u0 + u) * sizeof(uint64_t), scale);
            else  // a piece of more than 64 units (H > 8192 with one piece per row)
              port.put_value(to.peer, meta + (1 + u0 + u) * sizeof(uint64_t), scales[u]);
          }
        }
      }
    }
    __syncwarp();  // dst[warp] is rewritten for the next piece
  }
  // kInternode: every put of this warp has landed before the block takes its ticket, so the
  // counts the last block signals cover every block's rows.
  if constexpr (kInternode) port.flush();
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  // The last block to finish publishes every (expert, this rank) count: by then every block's
  // rows are written (is_last_block fences before its ticket), so one release per word covers
  // them. Experts this rank sends nothing to get count 0.
  if (transport::is_last_block(ctx, blocks)) {
    if (ok && !transport::aborted(ctx)) {
      const device::Scope sc = transport::scope(ctx);
      const int64_t used_words = (p.num_tokens + 31) / 32;
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        if ((masked >> (e / L)) & 1ull) continue;
        if constexpr (kInternode)
          if (!same_node(ctx, e / L)) continue;
        const uint32_t count =
            static_cast<uint32_t>(layout::bitmap_count(bitmaps.row(e), used_words));
        sc.store_release(count_word(ctx, e / L, b, e % L, me), (seq << kCountShift) | count);
      }
      if constexpr (kInternode) {
        // A rank of another node gets its count words put, then one signal per (buffer,
        // source) that its receive phase waits for (the rows of every block landed before).
        const int R = ctx.num_ranks, warps = blockDim.x / kWarpLanes;
        for (int d = warp; d < R; d += warps) {
          if (same_node(ctx, d)) continue;
          for (int le0 = 0; le0 < L; le0 += kWarpLanes) {
            // Lane j counts expert le0 + j (the counts' loads in flight together), then the
            // counts are put one by one from registers.
            uint32_t mine = 0;
            if (le0 + lane < L)
              mine = static_cast<uint32_t>(layout::bitmap_count(
                  bitmaps.row(static_cast<int64_t>(d) * L + le0 + lane), used_words));
            const int last = min(L, le0 + kWarpLanes);
            for (int le = le0; le < last; ++le) {
              const uint32_t count = __shfl_sync(kFullMask, mine, le - le0);
              port.put_value(d,
                             ctx.ll.count_sig +
                                 ((static_cast<uint64_t>(b) * L + le) * R + me) * sizeof(uint64_t),
                             (seq << kCountShift) | count);
            }
          }
          port.signal(d, signal_at(ctx, ctx.ll.sig_counts, b, me), 1);
        }
        // Every block has seen every remote arrival of this call: take them back.
        for (int d = threadIdx.x; d < R; d += blockDim.x)
          if (!same_node(ctx, d))
            rdma::consume_signal(ctx, ctx.ll.sig_arrive + d * sizeof(uint64_t), 1);
      }
    }
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (p.receive) receive_counts<kInternode>(ctx, p.recv, seq);  // no hook: the receive phase
    __syncthreads();
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

template <bool kInternode, int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    dispatch_send_kernel(const __grid_constant__ DeviceContext ctx, const DispatchSendParams p) {
  extern __shared__ uint32_t columns[];  // the layout's bitmap columns
  dispatch_send<kInternode, device::quantize_load_steps(kBlockThreads)>(
      ctx, p, device::whole_grid(), columns);
}

/// One block: waits for every (local expert, source) count of call `seq` and writes the receive
/// layout and per-expert counts. kInternode: a source on another node is waited for through its
/// counter signal (then its count words, put before it, are read), and the source tokens and
/// scales of its slots are moved from the meta words to their places.
template <bool kInternode>
__device__ void receive_counts(const DeviceContext& ctx, const DispatchRecvParams& p,
                               uint64_t seq) {
  const int R = ctx.num_ranks, L = ctx.local_experts, M = ctx.ll.capacity, b = p.buffer;
  const uint64_t* words = count_word(ctx, ctx.rank, b, 0, 0);
  bool ok = true;
  if constexpr (kInternode) {
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      if (same_node(ctx, s)) continue;
      const uint64_t sig = signal_at(ctx, ctx.ll.sig_counts, b, s);
      if (!rdma::wait_signal(ctx, sig, 1, s, Phase::kRdmaCounts, b)) {
        ok = false;
        continue;
      }
      rdma::consume_signal(ctx, sig, 1);
    }
    if (!__syncthreads_and(ok)) return;
  }
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int le = i / R, s = i % R;
    if constexpr (kInternode) {
      if (!same_node(ctx, s)) {  // signalled above
        p.recv_layout[2 * i] = s * M;
        p.recv_layout[2 * i + 1] =
            static_cast<int32_t>(transport::scope(ctx).load_acquire(words + i) & kCountMask);
        continue;
      }
    }
    if (!transport::wait_geq(ctx, words + i, seq << kCountShift, s, Phase::kLlCounts, le)) {
      ok = false;
      break;
    }
    p.recv_layout[2 * i] = s * M;
    p.recv_layout[2 * i + 1] =  // a masked source (or one masked while waited for) sent nothing
        transport::is_masked(ctx, s)
            ? 0
            : static_cast<int32_t>(transport::scope(ctx).load_acquire(words + i) & kCountMask);
  }
  if (!__syncthreads_and(ok)) return;
  device::trace_mark(ctx, seq, TraceMark::kReceived);  // counts in: the receive layout follows
  for (int le = threadIdx.x; le < L; le += blockDim.x) {
    int32_t sum = 0;
    for (int s = 0; s < R; ++s) sum += p.recv_layout[2 * (le * R + s) + 1];
    p.recv_count[le] = sum;
  }
  if constexpr (kInternode) {
    const int H = ctx.hidden, groups = p.fp8 ? H / kFp8Group : 0, words_per = 1 + groups;
    const int64_t meta_words = ctx.ll.meta_words;
    const volatile uint64_t* meta = transport::peer_region<uint64_t>(ctx, ctx.rank, ctx.ll.meta[b]);
    int32_t* src = transport::peer_region<int32_t>(ctx, ctx.rank, ctx.ll.src_token[b]);
    float* scales = transport::peer_region<float>(ctx, ctx.rank, ctx.ll.scales[b]);
    // One warp per (expert, remote source), kMetaUnroll words per lane in flight: the block's
    // warps and lanes all copy at once (a loop of dependent loads would cost a latency each).
    // Only the remote pairs are dealt to the warps (pair q: expert q / (R - G), the (q % (R -
    // G))-th rank off this node), so that every warp has a share: dealing all L * R pairs by a
    // stride of the warp count (a multiple of R) gave each warp one source, and the warps of this
    // node's sources nothing.
    constexpr int kMetaUnroll = 4;
    const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
    const int G = ctx.node_size, off_node = R - G;
    for (int q = warp; q < L * off_node; q += blockDim.x / kWarpLanes) {
      const int r = q % off_node;
      const int s = r < ctx.node * G ? r : r + G;  // the r-th rank not on this node
      const int i = (q / off_node) * R + s;
      const int64_t first = static_cast<int64_t>(i / R) * R * M + static_cast<int64_t>(s) * M;
      const int n = p.recv_layout[2 * i + 1] * words_per;
      for (int j0 = lane; j0 < n; j0 += kWarpLanes * kMetaUnroll) {
        uint64_t v[kMetaUnroll];
#pragma unroll
        for (int u = 0; u < kMetaUnroll; ++u) {
          const int j = j0 + u * kWarpLanes;
          if (j < n) v[u] = meta[(first + j / words_per) * meta_words + j % words_per];
        }
#pragma unroll
        for (int u = 0; u < kMetaUnroll; ++u) {
          const int j = j0 + u * kWarpLanes;
          if (j >= n) break;
          const int64_t slot = first + j / words_per;
          const int w = j % words_per;
          if (w == 0)
            src[slot] = static_cast<int32_t>(static_cast<uint32_t>(v[u]));
          else
            scales[slot * (H / kFp8Group) + w - 1] = __uint_as_float(static_cast<uint32_t>(v[u]));
        }
      }
    }
  }
}

template <bool kInternode>
__global__ void __launch_bounds__(kRecvThreads)
    dispatch_recv_kernel(const __grid_constant__ DeviceContext ctx, const DispatchRecvParams p) {
  receive_counts<kInternode>(ctx, p, ctx.ll.dispatch_seq[p.buffer]);
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads, 1)
    group_dispatch_send_kernel(const __grid_constant__ GroupDispatchSend g) {
  extern __shared__ uint32_t columns[];
  const int r = group_rank(g.launch);
  dispatch_send<false, device::quantize_load_steps(kBlockThreads), true>(
      g.ctx[r], g.params[r], group_blocks(g.launch), columns);
}

/// Chooses where p's layout step builds the expert bitmaps (every block its own copy in shared
/// memory where they fit, else global memory) and returns the shared memory a block needs for it.
size_t choose_layout(const DeviceContext& ctx, DispatchSendParams& p, int threads) {
  p.layout.block_bitmaps = layout::block_bitmaps_fit(ctx.num_experts, p.num_tokens);
  return p.layout.block_bitmaps ? layout::block_bitmap_smem_bytes(ctx.num_experts, p.num_tokens)
                                : layout::column_smem_bytes(ctx.num_experts, threads);
}

}  // namespace

void launch_dispatch_send(const DeviceContext& ctx, const DispatchSendParams& params, int blocks,
                          int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::dispatch_send_kernel");
  DispatchSendParams p = params;
  const size_t smem = choose_layout(ctx, p, threads);
  detail::with_register_budget(threads, [&](auto budget) {
    constexpr int kThreads = decltype(budget)::value;
    if (ctx.num_nodes > 1)
      dispatch_send_kernel<true, kThreads><<<blocks, threads, smem, stream>>>(ctx, p);
    else
      dispatch_send_kernel<false, kThreads><<<blocks, threads, smem, stream>>>(ctx, p);
  });
  MOECOMM_LAUNCH_CHECK("ll::dispatch_send_kernel");
}

void launch_dispatch_recv(const DeviceContext& ctx, const DispatchRecvParams& params,
                          cudaStream_t stream) {
  if (ctx.num_nodes > 1)
    dispatch_recv_kernel<true><<<1, kRecvThreads, 0, stream>>>(ctx, params);
  else
    dispatch_recv_kernel<false><<<1, kRecvThreads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::dispatch_recv_kernel");
}

void launch_group_dispatch(const GroupDispatchSend& group, int threads, cudaStream_t stream) {
  const int blocks = group.launch.ranks * group.launch.blocks_per_rank;
  check_grid(blocks, threads, "ll::group_dispatch_send_kernel");
  // Each rank chooses for its own tokens; one shared-memory size serves every rank's blocks.
  auto g = std::make_unique<GroupDispatchSend>(group);
  size_t smem = 0;
  for (int r = 0; r < g->launch.ranks; ++r)
    smem = std::max(smem, choose_layout(g->ctx[r], g->params[r], threads));
  detail::with_register_budget(threads, [&](auto budget) {
    group_dispatch_send_kernel<decltype(budget)::value><<<blocks, threads, smem, stream>>>(*g);
  });
  MOECOMM_LAUNCH_CHECK("ll::group_dispatch_send_kernel");
}

void preload_dispatch_kernels() {
  detail::for_each_register_budget([](auto budget) {
    constexpr int kThreads = decltype(budget)::value;
    detail::preload_kernel(dispatch_send_kernel<false, kThreads>, layout::kColumnSmemLimit);
    detail::preload_kernel(dispatch_send_kernel<true, kThreads>, layout::kColumnSmemLimit);
    detail::preload_kernel(group_dispatch_send_kernel<kThreads>, layout::kColumnSmemLimit);
  });
  detail::preload_kernel(dispatch_recv_kernel<false>);
  detail::preload_kernel(dispatch_recv_kernel<true>);
}

}  // namespace moecomm::ll
