#include "ht/intranode.hpp"

#include <algorithm>

#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "ht/token_metadata.cuh"
#include "layout/layout.hpp"
#include "layout/layout_steps.cuh"
#include "runtime/cuda_check.hpp"
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
constexpr int kCombineBatch = 8;  // source rows loaded before they are summed
using detail::kMaxBlockThreads;

/// Each kernel is built for two register budgets. Blocks of up to kWideBlockThreads threads get
/// 128 registers a thread, spent on more bytes in flight per warp: the kernels stream HBM and, at
/// 16 or fewer SMs a rank, an SM's loads in flight bound its throughput. Larger blocks get 64.
constexpr int kWideBlockThreads = 512;

template <int kBlockThreads>
struct Budget {
  static constexpr bool kWide = kBlockThreads <= kWideBlockThreads;
  /// quantize_groups steps loaded at once: 4 KB (wide) or 2 KB a warp.
  static constexpr int kQuantizeUnroll =
      kWide ? 2 * device::kQuantizeUnroll : device::kQuantizeUnroll;
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
};

/// Where token t goes: from the layout (fresh) or from the handle (cached). Fresh routes are
/// recorded in the handle.
__device__ TokenRoute route_token(const DeviceContext& ctx, const DispatchParams& p, int64_t t,
                                  int lane) {
  const int R = ctx.num_ranks;
  TokenRoute r;
  int32_t* record = p.send_row + t * R;
  if (p.cached) {
    // A rank masked since the handle was made receives nothing.
    const uint64_t masked = transport::masked_peers(ctx);
    if (lane < R && !((masked >> lane) & 1ull)) r.lo = record[lane];
    if (lane + 32 < R && !((masked >> (lane + 32)) & 1ull)) r.hi = record[lane + 32];
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
  r.mask = static_cast<uint64_t>(__ballot_sync(kFullMask, r.lo >= 0)) |
           (static_cast<uint64_t>(__ballot_sync(kFullMask, r.hi >= 0)) << 32);
  return r;
}

__device__ __forceinline__ int pop_lowest(uint64_t& m) {
  const int d = __ffsll(static_cast<long long>(m)) - 1;
  m &= m - 1;
  return d;
}

/// Copies one row of `bytes` (a multiple of 16) to every destination of the route.
__device__ void copy_row(const DeviceContext& ctx, const TokenRoute& route, const uint8_t* src,
                         int bytes, int lane) {
  const int n16 = bytes / 16;
  device::copy_vectors(reinterpret_cast<const int4*>(src), n16, lane,
                       [&](int base, const int4(&v)[device::kRowCopyUnroll]) {
                         for (uint64_t m = route.mask; m;) {
                           const int d = pop_lowest(m);
                           int4* dst =
                               reinterpret_cast<int4*>(ctx.peers[d] + ctx.ht.x +
                                                       static_cast<int64_t>(route.row(d)) * bytes);
#pragma unroll
                           for (int u = 0; u < device::kRowCopyUnroll; ++u) {
                             const int i = base + u * device::kWarpLanes + lane;
                             if (i < n16) device::st_stream_16(dst + i, v[u]);
                           }
                         }
                       });
}

/// Quantises one bf16 row to e4m3 (one scale per 128 channels) and stores data and scales to
/// every destination from registers: a warp instruction per step, destination and piece.
template <int kUnroll>
__device__ void quantize_row_direct(const DeviceContext& ctx, const TokenRoute& route,
                                    const uint8_t* src, bool pow2, int lane) {
  const int H = ctx.hidden, groups = H / kFp8Group;
  device::quantize_groups<kUnroll>(
      reinterpret_cast<const int4*>(src), groups, pow2, lane,
      [&](int g, int sub, uint4 q, float scale, bool valid) {
        for (uint64_t m = route.mask; m;) {
          const int d = pop_lowest(m);
          const int64_t row = route.row(d);  // every lane takes part in the shuffle
          if (!valid) continue;
          uint8_t* dst = ctx.peers[d] + ctx.ht.x + row * H;
          *reinterpret_cast<uint4*>(dst + g * kFp8Group + sub * device::kChannelsPerLane) = q;
          if (sub == 0)
            reinterpret_cast<float*>(ctx.peers[d] + ctx.ht.scales)[row * groups + g] = scale;
        }
      });
}

/// The same through the warp's staging ring: each step leaves in bulk (TMA) stores, one per
/// destination for the data and one for the scales.
template <int kUnroll>
__device__ void quantize_row_staged(const DeviceContext& ctx, const TokenRoute& route,
                                    const uint8_t* src, bool pow2, int lane,
                                    device::QuantizeStaging<kUnroll>& staging) {
  const int H = ctx.hidden, groups = H / kFp8Group;
  device::RowDestinations to;
  for (uint64_t m = route.mask; m;) {
    const int d = pop_lowest(m);
    const int64_t row = route.row(d);  // every lane takes part in the shuffle
    to.add(ctx.peers[d] + ctx.ht.x + row * H,
           reinterpret_cast<float*>(ctx.peers[d] + ctx.ht.scales) + row * groups, lane);
  }
  device::quantize_row_staged<kUnroll>(reinterpret_cast<const int4*>(src), groups, pow2, lane,
                                       staging, to);
}

/// One token: its metadata and its row (quantised or copied) to every destination rank.
template <int kBlockThreads>
__device__ __forceinline__ void dispatch_token(
    const DeviceContext& ctx, const DispatchParams& p, int64_t t, int groups, int lane,
    device::QuantizeStaging<Budget<kBlockThreads>::kQuantizeUnroll>& staging) {
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

  const uint8_t* src = static_cast<const uint8_t*>(p.x) + t * p.in_row_bytes;
  constexpr int kUnroll = Budget<kBlockThreads>::kQuantizeUnroll;
  if (p.quantize && p.bulk_stores)
    quantize_row_staged<kUnroll>(ctx, route, src, p.pow2_scales, lane, staging);
  else if (p.quantize)
    quantize_row_direct<kUnroll>(ctx, route, src, p.pow2_scales, lane);
  else
    copy_row(ctx, route, src, p.in_row_bytes, lane);
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    dispatch_kernel(DeviceContext ctx, DispatchParams p) {
  // The layout's bitmap columns, then (once the layout is done) the warps' staging rings.
  extern __shared__ __align__(16) uint32_t columns[];
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
  using Staging = device::QuantizeStaging<Budget<kBlockThreads>::kQuantizeUnroll>;
  __syncthreads();  // the layout's columns are no longer read
  Staging staging{reinterpret_cast<uint8_t*>(columns) + (threadIdx.x / 32) * Staging::kWarpBytes};
  const device::WorkQueue queue{ctx.local.work_queue};
  for (int64_t t = ok ? queue.unit(queue.draw(lane)) : p.num_tokens; t < p.num_tokens;) {
    const uint32_t next = queue.draw(lane);
    dispatch_token<kBlockThreads>(ctx, p, t, groups, lane, staging);
    t = queue.unit(next);
  }
  device::bulk_wait_all();  // the rows are written before the block counts as done
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    if (threadIdx.x == 0) queue.reset();
    transport::signal_and_wait_all(ctx, FlagKind::kDispatchDone, seq, Phase::kDispatchDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

template <int kBlockThreads>
__global__ void __launch_bounds__(kBlockThreads)
    combine_kernel(DeviceContext ctx, CombineParams p) {
  constexpr int kVectors = Budget<kBlockThreads>::kCombineVectors;
  const uint64_t seq = device::read_call_seq(ctx);
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden, me = ctx.rank;
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
  bool ok = true;
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
  }
  ok = __syncthreads_and(ok) != 0;
  device::trace_mark(ctx, seq, TraceMark::kOpened);

  const int n16 = H / 8;
  const device::WorkQueue queue{ctx.local.work_queue};
  for (int64_t t = ok ? queue.unit(queue.draw(lane)) : p.num_tokens, next_t; t < p.num_tokens;
       t = next_t) {
    const uint32_t next = queue.draw(lane);
    TokenRoute route;
    if (lane < R && !((masked >> lane) & 1ull)) route.lo = p.send_row[t * R + lane];
    if (lane + 32 < R && !((masked >> (lane + 32)) & 1ull))
      route.hi = p.send_row[t * R + lane + 32];
    route.mask = static_cast<uint64_t>(__ballot_sync(kFullMask, route.lo >= 0)) |
                 (static_cast<uint64_t>(__ballot_sync(kFullMask, route.hi >= 0)) << 32);
    // The loop bound is warp-uniform: every lane takes part in route.row()'s shuffle. A lane
    // sums kVectors vectors of 8 channels: i = base + u * 32 + lane.
    for (int base = 0; base < n16; base += kVectors * 32) {
      float acc[kVectors][8] = {};
      // Up to kCombineBatch source rows in flight, then summed in ascending rank order.
      for (uint64_t m = route.mask; m;) {
        int4 v[kCombineBatch][kVectors];
        int loaded = 0;
#pragma unroll
        for (int b = 0; b < kCombineBatch; ++b) {
          if (!m) break;  // warp-uniform
          const int d = pop_lowest(m);
          const uint16_t* row = y_of[d] + static_cast<int64_t>(route.row(d)) * H;  // no int wrap
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
          for (int u = 0; u < kVectors; ++u) {
            if (base + u * 32 + lane >= n16) continue;
            float f[8];
            device::unpack_bf16x8(v[b][u], f);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[u][j] = __fadd_rn(acc[u][j], f[j]);
          }
        }
      }
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
    if (p.combined_weights) {
      float sum = 0.0f;
      for (uint64_t m = route.mask; m;) {
        const int d = pop_lowest(m);
        const int64_t row = route.row(d);  // every lane takes part in the shuffle
        if (lane < K && w_of[d]) sum = __fadd_rn(sum, w_of[d][row * K + lane]);
      }
      if (lane < K) p.combined_weights[t * K + lane] = sum;
    }
    next_t = queue.unit(next);
  }
  device::trace_block_mark(ctx, seq, TraceMark::kStreamed);

  if (transport::is_last_block(ctx)) {
    // Tell every owner its outputs have been read; wait until every reader is done with ours
    // (the caller may overwrite y as soon as combine returns on its stream).
    if (threadIdx.x == 0) queue.reset();
    transport::signal_and_wait_all(ctx, FlagKind::kCombineDone, seq, Phase::kCombineDone, 0);
    device::trace_mark(ctx, seq, TraceMark::kClosed);
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

/// Whether quantised rows should leave in bulk stores. Measured on the H200 with 8 ranks on the
/// GPU (bench/NOTES.md v22): where the group's SMs are few, a warp's store instructions bound
/// its rows and bulk stores move them 9 % faster (8 SMs a rank); where the group streams from
/// nearly every SM, the memory is the bound and register stores take it 5 % better (16 SMs).
/// Bulk stores are used while the group's blocks on this GPU fill at most half of its SMs.
bool bulk_stores_pay(const DeviceContext& ctx, int blocks) {
  int device = 0, sms = 0;
  MOECOMM_CUDA_CHECK(cudaGetDevice(&device));
  MOECOMM_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t ranks_here = ctx.one_gpu ? ctx.num_ranks : 1;
  return 2 * ranks_here * blocks <= sms;
}

/// Shared memory for the staging rings of a block of `threads` threads.
size_t staging_smem_bytes(int threads) {
  const int warps = (threads + 31) / 32;
  if (threads <= kWideBlockThreads)
    return size_t(warps) *
           device::QuantizeStaging<Budget<kWideBlockThreads>::kQuantizeUnroll>::kWarpBytes;
  return size_t(warps) *
         device::QuantizeStaging<Budget<kMaxBlockThreads>::kQuantizeUnroll>::kWarpBytes;
}

}  // namespace

void launch_dispatch(const DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream) {
  const size_t columns = params.cached ? 0 : layout::column_smem_bytes(ctx.num_experts, threads);
  DispatchParams p = params;
  p.bulk_stores = params.quantize && bulk_stores_pay(ctx, blocks);
  const size_t rings = p.bulk_stores ? staging_smem_bytes(threads) : 0;
  const size_t smem = std::max(columns, rings);
  if (threads <= kWideBlockThreads)
    dispatch_kernel<kWideBlockThreads><<<blocks, threads, smem, stream>>>(ctx, p);
  else
    dispatch_kernel<kMaxBlockThreads><<<blocks, threads, smem, stream>>>(ctx, p);
  MOECOMM_LAUNCH_CHECK("ht::dispatch_kernel");
}

void launch_combine(const DeviceContext& ctx, const CombineParams& params, int blocks, int threads,
                    cudaStream_t stream) {
  if (threads <= kWideBlockThreads)
    combine_kernel<kWideBlockThreads><<<blocks, threads, 0, stream>>>(ctx, params);
  else
    combine_kernel<kMaxBlockThreads><<<blocks, threads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ht::combine_kernel");
}

namespace {

template <int kBlockThreads>
void preload_budget() {
  cudaFuncAttributes attr;
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_kernel<kBlockThreads>));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      dispatch_kernel<kBlockThreads>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(std::max(layout::kColumnSmemLimit, staging_smem_bytes(kBlockThreads)))));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_kernel<kBlockThreads>));
}

}  // namespace

void preload_kernels() {
  preload_budget<kWideBlockThreads>();
  preload_budget<kMaxBlockThreads>();
}

}  // namespace moecomm::ht
