#include "ht/intranode.hpp"

#include <algorithm>

#include "device/bulk_load_ring.cuh"
#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "ht/token_metadata.cuh"
#include "layout/layout.hpp"
#include "layout/layout_steps.cuh"
#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"
#include "runtime/register_budget.hpp"
#include "transport/barrier.cuh"
#include "transport/signal.cuh"

namespace moecomm::ht {

using detail::DeviceContext;
using detail::FlagKind;
using detail::kFp8Group;
using detail::Phase;
using detail::TraceMark;

namespace {

using device::kFullMask;
using device::pop_lowest;
constexpr int kCombineBatch = 8;  // source rows loaded before they are summed
/// Combine's bulk-load ring: pieces of 4 KB of a source row (16 channels a lane), up to 4 a warp.
/// Pieces of 1-2 KB leave an SM's bulk copies slower than its register loads, 6-8 KB too few in
/// flight (bench/NOTES.md v24).
using CombineRing = device::BulkLoadRing<4096>;
constexpr int kCombineRingSlots = 4;
using detail::kMaxBlockThreads;
using detail::kWideBlockThreads;

/// Each kernel is built for both register budgets (runtime/register_budget.hpp); the wide one
/// spends its registers on more bytes in flight per warp: the kernels stream HBM and, at 16 or
/// fewer SMs a rank, an SM's loads in flight bound its throughput.

template <int kBlockThreads>
struct Budget {
  static constexpr bool kWide = kBlockThreads <= kWideBlockThreads;
  static constexpr int kQuantizeUnroll = device::quantize_load_steps(kBlockThreads);
  /// 16-byte vectors of each source row a lane loads at once in combine.
  static constexpr int kCombineVectors = kWide ? 2 : 1;
};

/// Destinations of one token, as seen by every lane of the warp: rows at ranks d < 32 live in
/// lane d's `lo`, rows at ranks 32..63 in lane d-32's `hi`.
struct TokenRoute {
  int32_t lo = -1;
  int32_t hi = -1;
  uint64_t mask = 0;

  __device__ int32_t row(int d) const { return __shfl_sync(kFullMask, d < 32 ? lo : hi, d & 31); }
  /// Sets `mask` from the lanes' rows (every lane takes part).
  __device__ void gather_mask() {
    mask = static_cast<uint64_t>(__ballot_sync(kFullMask, lo >= 0)) |
           (static_cast<uint64_t>(__ballot_sync(kFullMask, hi >= 0)) << 32);
  }
};

/// The rows a handle recorded for a token (`record`: its row at each of the R ranks, -1: none),
/// without the ranks in `masked` (they receive nothing, and nothing is read from them); the mask
/// is left to gather_mask().
__device__ __forceinline__ TokenRoute recorded_rows(const int32_t* record, int R, uint64_t masked,
                                                    int lane) {
  TokenRoute r;
  if (lane < R && !((masked >> lane) & 1ull)) r.lo = record[lane];
  if (lane + 32 < R && !((masked >> (lane + 32)) & 1ull)) r.hi = record[lane + 32];
  return r;
}

/// Where token t goes: from the layout (fresh) or from the handle (cached). Fresh routes are
/// recorded in the handle.
__device__ TokenRoute route_token(const DeviceContext& ctx, const DispatchParams& p, int64_t t,
                                  int lane) {
  const int R = ctx.num_ranks;
  int32_t* record = p.send_row + t * R;
  TokenRoute r;
  if (p.cached) {
    // A rank masked since the handle was made receives nothing.
    r = recorded_rows(record, R, transport::masked_peers(ctx), lane);
  } else {
    const uint64_t mask = ctx.layout.token_rank_mask[t];
    const int W = ctx.words;
    auto row_at = [&](int d) -> int32_t {
      if (!((mask >> d) & 1ull)) return -1;
      return ctx.layout.send_base[d] +
             layout::bitmap_position(ctx.layout.rank_bitmap + static_cast<int64_t>(d) * W,
                                     ctx.layout.rank_word_prefix + static_cast<int64_t>(d) * W, t);
    };
    // Rows past the capacity were reported by the layout (on every rank); they are dropped,
    // never written, and the handle records them as absent so that combine never reads them.
    auto kept = [&](int32_t row) { return row >= ctx.ht.capacity ? -1 : row; };
    if (lane < R) record[lane] = r.lo = kept(row_at(lane));
    if (lane + 32 < R) record[lane + 32] = r.hi = kept(row_at(lane + 32));
  }
  r.gather_mask();
  return r;
}

/// The rows token `route` goes to (`row_bytes` each), data and scales at each destination rank,
/// as the lanes hold them (every lane takes part in the route's shuffles).
__device__ __forceinline__ device::RowDestinations destinations_of(const DeviceContext& ctx,
                                                                   const TokenRoute& route,
                                                                   int row_bytes, int lane) {
  const int groups = ctx.hidden / kFp8Group;
  device::RowDestinations to;
  for (uint64_t m = route.mask; m;) {
    const int d = pop_lowest(m);
    const int64_t row = route.row(d);
    to.add(ctx.peers[d] + ctx.ht.x + row * row_bytes,
           reinterpret_cast<float*>(ctx.peers[d] + ctx.ht.scales) + row * groups, lane);
  }
  return to;
}

/// One token: its metadata and its row (quantised or copied) to every destination rank.
template <int kBlockThreads>
__device__ __forceinline__ void dispatch_token(const DeviceContext& ctx, const DispatchParams& p,
                                               int64_t t, int groups, int lane) {
  const int K = ctx.topk;
  const TokenRoute route = route_token(ctx, p, t, lane);
  if (route.mask == 0) return;

  // Metadata: local expert ids (-1 elsewhere), weights, source token.
  int64_t e = -1;
  float w = 0.0f;
  if (lane < K) {
    e = p.idx_i64 ? static_cast<const int64_t*>(p.topk_idx)[t * K + lane]
                  : static_cast<const int32_t*>(p.topk_idx)[t * K + lane];
    if (p.topk_weights) w = p.topk_weights[t * K + lane];
  }
  for (uint64_t m = route.mask; m;) {
    const int d = pop_lowest(m);
    const int64_t row = route.row(d);
    store_token_metadata(ctx, d, row, t, e, w, p.topk_weights != nullptr, lane);
    if (p.x_scales) {
      for (int g = lane; g < groups; g += 32)
        transport::peer_region<float>(ctx, d, ctx.ht.scales)[row * groups + g] =
            p.x_scales[t * groups + g];
    }
  }

  const int4* src =
      reinterpret_cast<const int4*>(static_cast<const uint8_t*>(p.x) + t * p.in_row_bytes);
  const device::RowDestinations to = destinations_of(ctx, route, p.out_row_bytes, lane);
  if (p.quantize)
    device::quantize_row_to<Budget<kBlockThreads>::kQuantizeUnroll>(src, groups, p.pow2_scales, to,
                                                                    lane);
  else
    device::copy_row_to(src, p.in_row_bytes / 16, to, lane);
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    dispatch_kernel(DeviceContext ctx, DispatchParams p) {
  extern __shared__ __align__(16) uint32_t columns[];  // the layout's bitmap columns
  const uint64_t seq = device::read_call_seq(ctx);
  const int lane = threadIdx.x & 31;

  bool ok = true;
  if (!p.cached) {
    ok = layout::compute_layout(ctx, p.layout, seq, columns, device::whole_grid());
  } else {
    // No count exchange ran: make sure every destination has entered this call (its previous
    // results are no longer in use) before writing into it.
    transport::announce_arrival(ctx, seq, device::whole_grid());
    ok = transport::await_arrivals(ctx, seq, device::whole_grid());
  }
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  const int groups = ctx.hidden / kFp8Group;
  const device::WorkQueue queue{ctx.local.work_queue};
  for (int64_t t = ok ? queue.unit(queue.draw(lane)) : p.num_tokens; t < p.num_tokens;) {
    const uint32_t next = queue.draw(lane);
    dispatch_token<kBlockThreads>(ctx, p, t, groups, lane);
    t = queue.unit(next);
  }
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    if (threadIdx.x == 0) queue.reset();
    transport::signal_and_wait_all(ctx, FlagKind::kDispatchDone, seq, Phase::kDispatchDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

/// Where combine reads token t's expert outputs: the row at each peer that holds one.
__device__ __forceinline__ TokenRoute combine_route(const CombineParams& p, int R, uint64_t masked,
                                                    int64_t t, int lane) {
  TokenRoute route = recorded_rows(p.send_row + t * R, R, masked, lane);
  route.gather_mask();
  return route;
}

/// The peers' rows a combine block reads: published addresses, resolved once per block.
struct CombineSources {
  const uint16_t* const* y_of;  // shared memory, [R]
  const float* const* w_of;     // shared memory, [R]
};

/// Writes the lane's kVectors summed vectors of channel vectors base + u * 32 + lane of token t
/// (plus the bias), for those that exist.
template <int kVectors>
__device__ __forceinline__ void store_combined(const CombineParams& p, int64_t t, int H, int base,
                                               int n16, int lane, float (&acc)[kVectors][8]) {
#pragma unroll
  for (int u = 0; u < kVectors; ++u) {
    const int i = base + u * 32 + lane;
    if (i >= n16) continue;
    if (p.bias) {
      float b[8];
      device::unpack_bf16x8(*reinterpret_cast<const int4*>(p.bias + t * H + i * 8), b);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[u][j] = __fadd_rn(acc[u][j], b[j]);
    }
    *reinterpret_cast<int4*>(p.out + t * H + i * 8) = device::pack_bf16x8(acc[u]);
  }
}

/// acc += the 8 bf16 channels of v (in f32, rounded at each add: the same bits on every path).
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], int4 v) {
  float f[8];
  device::unpack_bf16x8(v, f);
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], f[j]);
}

/// Token t's combined weights: the sum, in ascending rank order, of its K weights at each peer.
__device__ __forceinline__ void store_combined_weights(const CombineParams& p,
                                                       const CombineSources& src,
                                                       const TokenRoute& route, int64_t t, int K,
                                                       int lane) {
  float sum = 0.0f;
  for (uint64_t m = route.mask; m;) {
    const int d = pop_lowest(m);
    const int64_t row = route.row(d);  // every lane takes part in the shuffle
    if (lane < K && src.w_of[d]) sum = __fadd_rn(sum, src.w_of[d][row * K + lane]);
  }
  if (lane < K) p.combined_weights[t * K + lane] = sum;
}

/// Combine's token loop with register loads: up to kCombineBatch source rows in flight a warp,
/// then summed in ascending rank order.
template <int kVectors>
__device__ void combine_tokens_by_registers(const DeviceContext& ctx, const CombineParams& p,
                                            const CombineSources& src, uint64_t masked, int lane) {
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden;
  const int n16 = H / 8;
  const device::WorkQueue queue{ctx.local.work_queue};
  for (int64_t t = queue.unit(queue.draw(lane)), next_t; t < p.num_tokens; t = next_t) {
    const uint32_t next = queue.draw(lane);
    const TokenRoute route = combine_route(p, R, masked, t, lane);
    // The loop bound is warp-uniform: every lane takes part in route.row()'s shuffle. A lane
    // sums kVectors vectors of 8 channels: i = base + u * 32 + lane.
    for (int base = 0; base < n16; base += kVectors * 32) {
      float acc[kVectors][8] = {};
      for (uint64_t m = route.mask; m;) {
        int4 v[kCombineBatch][kVectors];
        int loaded = 0;
#pragma unroll
        for (int b = 0; b < kCombineBatch; ++b) {
          if (!m) break;  // warp-uniform
          const int d = pop_lowest(m);
          const uint16_t* row = src.y_of[d] + static_cast<int64_t>(route.row(d)) * H;  // no wrap
#pragma unroll
          for (int u = 0; u < kVectors; ++u) {
            const int i = base + u * 32 + lane;
            if (i < n16) v[b][u] = device::ld_peer_16_any(row + i * 8);
          }
          loaded = b + 1;
        }
#pragma unroll
        for (int b = 0; b < kCombineBatch; ++b) {
          if (b >= loaded) break;
#pragma unroll
          for (int u = 0; u < kVectors; ++u)
            if (base + u * 32 + lane < n16) add_bf16x8(acc[u], v[b][u]);
        }
      }
      store_combined<kVectors>(p, t, H, base, n16, lane, acc);
    }
    if (p.combined_weights) store_combined_weights(p, src, route, t, K, lane);
    next_t = queue.unit(next);
  }
}

/// Combine's token loop with bulk loads: each source row's pieces of BulkLoadRing::kSlotBytes
/// land in the warp's ring of shared memory, in the order they are summed (piece by piece, each
/// piece's sources in ascending rank order), and the warp keeps the ring full across tokens: while
/// it sums one piece, the loads of the next ring's worth are in flight. Peers' rows must be
/// 16-byte aligned. Gives up after a load that never landed (recorded as a stall).
template <typename Ring>
__device__ void combine_tokens_by_bulk_loads(const DeviceContext& ctx, const CombineParams& p,
                                             const CombineSources& src, uint64_t masked, Ring& ring,
                                             uint64_t seq, int lane) {
  constexpr int kVectors = Ring::kSlotBytes / (16 * 32);
  constexpr int kPieceVectors = kVectors * 32;
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden;
  const int n16 = H / 8;
  const int pieces = (n16 + kPieceVectors - 1) / kPieceVectors;
  const int64_t T = p.num_tokens;
  const device::WorkQueue queue{ctx.local.work_queue};

  // The warp sums token t; its loads run up to one token ahead, into token `ahead`.
  int64_t t = queue.unit(queue.draw(lane));
  TokenRoute route = t < T ? combine_route(p, R, masked, t, lane) : TokenRoute{};
  uint32_t drawn = queue.draw(lane);
  int64_t ahead = T;
  TokenRoute ahead_route;
  bool loading_ahead = false;       // the loads have moved on to token `ahead`
  int load_piece = 0;               // the piece being loaded ...
  uint64_t load_left = route.mask;  // ... and its sources not yet loaded

  // Takes the warp's next token from the queue as `ahead`, its loads not yet begun; false when
  // the queue is empty.
  auto fetch_ahead = [&]() {
    ahead = queue.unit(drawn);
    if (ahead >= T) return false;
    ahead_route = combine_route(p, R, masked, ahead, lane);
    drawn = queue.draw(lane);
    load_piece = 0;
    load_left = ahead_route.mask;
    return true;
  };
  // Issues loads until the ring is full or nothing is left that may be loaded yet.
  auto fill_ring = [&]() {
    while (!ring.full()) {
      if (!load_left) {
        if (loading_ahead || t >= T || !fetch_ahead()) return;  // at most one token ahead
        loading_ahead = true;
        continue;  // a token with no sources loads nothing
      }
      const int d = pop_lowest(load_left);
      const int64_t at = loading_ahead ? ahead_route.row(d) : route.row(d);  // warp-uniform
      const int first = load_piece * kPieceVectors;
      ring.issue(src.y_of[d] + at * H + first * 8, min(kPieceVectors, n16 - first) * 16, lane);
      if (!load_left && ++load_piece < pieces)
        load_left = loading_ahead ? ahead_route.mask : route.mask;
    }
  };

  while (t < T) {
    fill_ring();
    for (int piece = 0; piece < pieces; ++piece) {
      const int base = piece * kPieceVectors;
      float acc[kVectors][8] = {};
      for (uint64_t m = route.mask; m;) {
        const int d = pop_lowest(m);
        const uint8_t* slot;
        if (!ring.wait_oldest(slot, ctx.timeout_ns)) {
          if (lane == 0)
            transport::record_error(ctx, detail::DeviceErrorKind::kStall, d, Phase::kCombineLoad,
                                    blockIdx.x, seq, 0);
          return;
        }
#pragma unroll
        for (int u = 0; u < kVectors; ++u)
          if (base + u * 32 + lane < n16)
            add_bf16x8(acc[u], reinterpret_cast<const int4*>(slot)[u * 32 + lane]);
        ring.release_oldest();
        fill_ring();
      }
      store_combined<kVectors>(p, t, H, base, n16, lane, acc);
    }
    if (p.combined_weights) store_combined_weights(p, src, route, t, K, lane);
    // On to the next token: the one the loads moved on to (fetched now if they had not).
    if (!loading_ahead) fetch_ahead();
    t = ahead;
    route = ahead_route;
    loading_ahead = false;
  }
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    combine_kernel(DeviceContext ctx, CombineParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int R = ctx.num_ranks, me = ctx.rank;
  const int lane = threadIdx.x & 31;
  const int parity = static_cast<int>(seq & 1);
  __shared__ const uint16_t* y_of[detail::kMaxRanks];
  __shared__ const float* w_of[detail::kMaxRanks];

  // Publish where this rank's expert outputs are, then learn where every peer's are. Loops over
  // peers: a block may have fewer threads than the group has ranks.
  const uint64_t masked = transport::masked_peers(ctx);  // nothing is read from or published to
  if (blockIdx.x == 0) {
    for (int d = threadIdx.x; d < R; d += blockDim.x) {
      if ((masked >> d) & 1ull) continue;
      uint64_t* slot = transport::peer_region<uint64_t>(ctx, d, ctx.ht.peer_ptrs) +
                       (parity * R + me) * detail::kPeerPtrs;
      slot[0] = p.y;
      slot[1] = p.recv_weights;
      transport::scope(ctx).fence();  // y (written by earlier kernels) and its address
      transport::signal(ctx, d, FlagKind::kCombineReady, seq);
    }
  }
  bool ok = true, aligned = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    // A slot is only read once its owner's signal arrived: after a failed wait it may be stale
    // (or null on a first call), so the block skips the reduction instead.
    if (!transport::wait_signal(ctx, FlagKind::kCombineReady, d, seq, Phase::kCombineReady,
                                blockIdx.x)) {
      ok = false;
      continue;
    }
    if ((masked >> d) & 1ull) {
      y_of[d] = nullptr;
      w_of[d] = nullptr;
      continue;
    }
    const uint64_t* slot = transport::peer_region<uint64_t>(ctx, me, ctx.ht.peer_ptrs) +
                           (parity * R + d) * detail::kPeerPtrs;
    y_of[d] = static_cast<const uint16_t*>(transport::resolve_address(ctx, d, slot[0]));
    w_of[d] =
        slot[1] ? static_cast<const float*>(transport::resolve_address(ctx, d, slot[1])) : nullptr;
    aligned = aligned && (reinterpret_cast<uintptr_t>(y_of[d]) & 15u) == 0;
  }
  ok = __syncthreads_and(ok) != 0;
  // Bulk loads need every peer's rows 16-byte aligned (hidden is a multiple of 8, so a row is
  // where its tensor is); a tensor view that starts elsewhere is read through registers.
  const bool bulk = p.bulk_load_slots > 0 && __syncthreads_and(aligned) != 0;
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  const CombineSources sources{y_of, w_of};
  if (ok && bulk) {
    extern __shared__ __align__(128) uint8_t ring_smem[];
    device::fence_generic_to_bulk();  // the loads read what the signals' acquires made visible
    CombineRing ring =
        CombineRing::in(ring_smem, threadIdx.x / 32, blockDim.x / 32, p.bulk_load_slots, lane);
    combine_tokens_by_bulk_loads(ctx, p, sources, masked, ring, seq, lane);
  } else if (ok) {
    combine_tokens_by_registers<Budget<kBlockThreads>::kCombineVectors>(ctx, p, sources, masked,
                                                                        lane);
  }
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    // Tell every owner its outputs have been read; wait until every reader is done with ours
    // (the caller may overwrite y as soon as combine returns on its stream).
    const device::WorkQueue queue{ctx.local.work_queue};
    if (threadIdx.x == 0) queue.reset();
    transport::signal_and_wait_all(ctx, FlagKind::kCombineDone, seq, Phase::kCombineDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

/// Whether the group's blocks on this GPU fill at most half of its SMs: few SMs a rank, where an
/// SM's loads in flight bound a kernel rather than the memory.
bool few_sms_a_rank(const DeviceContext& ctx, int blocks) {
  int device = 0, sms = 0;
  MOECOMM_CUDA_CHECK(cudaGetDevice(&device));
  MOECOMM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t ranks_here = ctx.one_gpu ? ctx.num_ranks : 1;
  return 2 * ranks_here * blocks <= sms;
}

/// Shared memory a combine block may give its warps' rings of bulk loads.
constexpr size_t kCombineRingSmem = 200 * 1024;

/// Slots a warp's ring of bulk loads gets in a block of `threads` threads.
int bulk_load_slots(int threads) {
  const int warps = (threads + 31) / 32;
  return static_cast<int>(
      std::min<size_t>(kCombineRingSlots, kCombineRingSmem / warps / CombineRing::kSlotFootprint));
}

/// Whether combine should read the peers' rows through bulk loads into shared memory rather than
/// through registers. Measured on the H200 with 8 ranks on the GPU (bench/NOTES.md v24): at 8 SMs
/// a rank an SM's register loads in flight bound combine (994 us) and bulk loads of 4 KB pieces,
/// 3 a warp, take it to 759 us; at 12 and 16 SMs the memory is the bound and registers do 5 % and
/// 1.5 % better. Bulk loads are used with few SMs a rank, where a warp gets 2 slots to overlap its
/// loads.
bool bulk_loads_pay(const DeviceContext& ctx, int blocks, int threads) {
  return few_sms_a_rank(ctx, blocks) && bulk_load_slots(threads) >= 2;
}

}  // namespace

void launch_dispatch(const DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream) {
  const size_t smem = params.cached ? 0 : layout::column_smem_bytes(ctx.num_experts, threads);
  detail::with_register_budget(threads, [&](auto budget) {
    dispatch_kernel<decltype(budget)::value><<<blocks, threads, smem, stream>>>(ctx, params);
  });
  MOECOMM_LAUNCH_CHECK("ht::dispatch_kernel");
}

void launch_combine(const DeviceContext& ctx, const CombineParams& params, int blocks, int threads,
                    cudaStream_t stream) {
  CombineParams p = params;
  p.bulk_load_slots = bulk_loads_pay(ctx, blocks, threads) ? bulk_load_slots(threads) : 0;
  const size_t smem = CombineRing::smem_bytes((threads + 31) / 32, p.bulk_load_slots);
  detail::with_register_budget(threads, [&](auto budget) {
    combine_kernel<decltype(budget)::value><<<blocks, threads, smem, stream>>>(ctx, p);
  });
  MOECOMM_LAUNCH_CHECK("ht::combine_kernel");
}

void preload_kernels() {
  detail::for_each_register_budget([](auto budget) {
    constexpr int kThreads = decltype(budget)::value;
    detail::preload_kernel(dispatch_kernel<kThreads>, layout::kColumnSmemLimit);
    detail::preload_kernel(combine_kernel<kThreads>, kCombineRingSmem);
  });
}

}  // namespace moecomm::ht
