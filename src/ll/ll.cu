#include "ll/ll.hpp"

#include <string>

#include "device/block.cuh"
#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "layout/layout.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "transport/signal.cuh"

namespace moecomm::ll {

using detail::DeviceContext;
using detail::FlagKind;
using detail::kFp8Group;
using detail::Phase;

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;  // largest block of the grid kernels
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
constexpr int kBf16PerVec = 8;    // bf16 in one 16-byte vector
constexpr int kCombineBatch = 8;  // slot rows loaded before they are accumulated
constexpr int kCountShift = 32;   // ll_count_sig word: (seq << 32) | count
constexpr uint64_t kCountMask = (1ull << kCountShift) - 1;
constexpr int kLlPeerPtrBase = 2;  // peer_ptrs slots 2 + buffer belong to LL combine
constexpr int kRecvThreads = 256;  // dispatch receive: one block
constexpr int kCombineSendThreads = detail::kMaxRanks;  // combine send: one block, one per peer

/// Word (b, le, src) of ll_count_sig in `owner`'s buffer.
__device__ __forceinline__ uint64_t* count_word(const DeviceContext& ctx, int owner, int b, int le,
                                                int src) {
  return transport::peer_region<uint64_t>(ctx, owner, ctx.sym.ll_count_sig) +
         (static_cast<int64_t>(b) * ctx.local_experts + le) * ctx.num_ranks + src;
}

__device__ __forceinline__ int64_t load_expert(const DispatchSendParams& p, int64_t i) {
  return p.idx_i64 ? static_cast<const int64_t*>(p.topk_idx)[i]
                   : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[i]);
}

/// Expert of pair (t, k), or -1 where the layout kernels counted nothing for it: -1 itself, out
/// of range, or a repeat of an earlier k of the token. Whole warp.
__device__ __forceinline__ int64_t pair_expert(const DeviceContext& ctx,
                                               const DispatchSendParams& p, int64_t t, int k,
                                               int lane) {
  const int64_t row = t * ctx.topk;
  const int64_t e = load_expert(p, row + k);
  const int64_t earlier = lane < k ? load_expert(p, row + lane) : -1;
  const bool repeat = __ballot_sync(kFullMask, lane < k && earlier == e) != 0;
  return (e < 0 || e >= ctx.num_experts || repeat) ? -1 : e;
}

/// Copies one bf16 row of n16 16-byte vectors to one destination.
__device__ void copy_row(const int4* src, int4* dst, int n16, int lane) {
  device::copy_vectors(src, n16, lane, [&](int base, const int4(&v)[device::kRowCopyUnroll]) {
#pragma unroll
    for (int u = 0; u < device::kRowCopyUnroll; ++u) {
      const int i = base + u * kWarpSize + lane;
      if (i < n16) device::st_stream_16(dst + i, v[u]);
    }
  });
}

/// Quantises one bf16 row to e4m3 + one f32 scale per 128 channels, to one destination.
__device__ void quantize_row(const int4* src, uint8_t* dst, float* scales, int groups, bool pow2,
                             int lane) {
  device::quantize_groups(
      src, groups, pow2, lane, [&](int g, int sub, uint4 q, float scale, bool valid) {
        if (!valid) return;
        *reinterpret_cast<uint4*>(dst + g * kFp8Group + sub * device::kChannelsPerLane) = q;
        if (sub == 0) scales[g] = scale;
      });
}

/// Every block: waits until every peer has entered this call (block 0 signals first). True in
/// every thread when all waits succeeded.
__device__ bool arrive_handshake(const DeviceContext& ctx, uint64_t seq) {
  const int R = ctx.num_ranks;
  if (blockIdx.x == 0)
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      transport::signal(ctx, d, FlagKind::kArrive, seq);
  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    ok = transport::wait_signal(ctx, FlagKind::kArrive, d, seq, Phase::kArrive, blockIdx.x) && ok;
  return __syncthreads_and(ok) != 0;
}

/// Lane 0, after the warp's writes for expert e: the warp that completes e's messages publishes
/// (seq, count) to e's owner.
__device__ __forceinline__ void count_message(const DeviceContext& ctx, int64_t e, int b,
                                              uint64_t seq) {
  const int L = ctx.local_experts;
  const uint32_t count = static_cast<uint32_t>(ctx.local.num_tokens_per_expert[e]);
  const device::Scope sc = transport::scope(ctx);
  sc.fence();  // this warp's rows before its increment
  const uint32_t old = atomicAdd(&ctx.local.ll_sent[e], 1u);
  if (old + 1 != count) return;
  ctx.local.ll_sent[e] = 0;  // e is complete: nobody else touches it in this call
  sc.fence();                // the other warps' rows (seen through the counter) before the count
  sc.store_release(count_word(ctx, static_cast<int>(e / L), b, static_cast<int>(e % L), ctx.rank),
                   (seq << kCountShift) | count);
}

__global__ void __launch_bounds__(kMaxThreads)
    dispatch_send_kernel(DeviceContext ctx, DispatchSendParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int R = ctx.num_ranks, E = ctx.num_experts, L = ctx.local_experts, K = ctx.topk;
  const int H = ctx.hidden, W = ctx.words, M = ctx.ll_capacity, me = ctx.rank, b = p.buffer;
  const int lane = threadIdx.x % kWarpSize;
  if (blockIdx.x == 0 && threadIdx.x == 0) ctx.local.ll_seq[b] = seq;

  const bool ok = arrive_handshake(ctx, seq);

  // Experts this rank sends nothing to are complete at once.
  if (ok && blockIdx.x == 0) {
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (ctx.local.num_tokens_per_expert[e] == 0)
        transport::scope(ctx).store_release(count_word(ctx, e / L, b, e % L, me),
                                            seq << kCountShift);
  }

  const int64_t slots_per_rank = static_cast<int64_t>(L) * R * M;
  const int groups = H / kFp8Group;
  const int warps = blockDim.x / kWarpSize;
  const int64_t pairs = p.num_tokens * K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  // One warp per (token, k) message. T <= M (checked by the host), so pos < M.
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / kWarpSize; i < pairs;
       i += stride) {
    const int64_t t = i / K;
    const int k = static_cast<int>(i % K);
    const int64_t e = pair_expert(ctx, p, t, k, lane);
    if (e < 0 || !ok) {
      if (lane == 0) p.slot_of[i] = -1;
      continue;
    }
    const int d = static_cast<int>(e / L), le = static_cast<int>(e % L);
    const int32_t pos = layout::bitmap_position(ctx.local.expert_bitmap + e * W,
                                                ctx.local.expert_word_prefix + e * W, t);
    const int64_t slot = static_cast<int64_t>(le) * R * M + static_cast<int64_t>(me) * M + pos;
    if (lane == 0) {
      p.slot_of[i] = static_cast<int32_t>(d * slots_per_rank + slot);
      transport::peer_region<int32_t>(ctx, d, ctx.sym.ll_src_token[b])[slot] =
          static_cast<int32_t>(t);
    }
    const int4* src = reinterpret_cast<const int4*>(p.x + t * H);
    if (p.fp8) {
      quantize_row(src, transport::peer_region<uint8_t>(ctx, d, ctx.sym.ll_x[b]) + slot * H,
                   transport::peer_region<float>(ctx, d, ctx.sym.ll_scales[b]) + slot * groups,
                   groups, p.pow2_scales, lane);
    } else {
      copy_row(src,
               transport::peer_region<int4>(ctx, d, ctx.sym.ll_x[b]) + slot * (H / kBf16PerVec),
               H / kBf16PerVec, lane);
    }
    __syncwarp();
    if (lane == 0) count_message(ctx, e, b, seq);
  }

  if (device::is_last_block(ctx) && threadIdx.x == 0) device::close_call(ctx);
}

__global__ void __launch_bounds__(kRecvThreads)
    dispatch_recv_kernel(DeviceContext ctx, DispatchRecvParams p) {
  const int R = ctx.num_ranks, L = ctx.local_experts, M = ctx.ll_capacity, b = p.buffer;
  const uint64_t seq = ctx.local.ll_seq[b];
  const uint64_t* words = count_word(ctx, ctx.rank, b, 0, 0);
  bool ok = true;
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int le = i / R, s = i % R;
    if (!transport::wait_geq(ctx, words + i, seq << kCountShift, s, Phase::kLlCounts, le)) {
      ok = false;
      break;
    }
    p.recv_layout[2 * i] = s * M;
    p.recv_layout[2 * i + 1] =
        static_cast<int32_t>(transport::scope(ctx).load_acquire(words + i) & kCountMask);
  }
  if (!__syncthreads_and(ok)) return;
  for (int le = threadIdx.x; le < L; le += blockDim.x) {
    int32_t sum = 0;
    for (int s = 0; s < R; ++s) sum += p.recv_layout[2 * (le * R + s) + 1];
    p.recv_count[le] = sum;
  }
}

__global__ void __launch_bounds__(kCombineSendThreads)
    combine_send_kernel(DeviceContext ctx, CombineSendParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int R = ctx.num_ranks, me = ctx.rank;
  if (threadIdx.x == 0) ctx.local.combine_seq[p.buffer] = seq;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    uint64_t* slot = transport::peer_region<uint64_t>(ctx, d, ctx.sym.peer_ptrs) +
                     ((kLlPeerPtrBase + p.buffer) * R + me) * detail::kPeerPtrs;
    slot[0] = p.y;
    transport::scope(ctx).fence();  // y (written by earlier kernels) and its address
    transport::signal(ctx, d, FlagKind::kCombineReady, seq);
  }
  if (threadIdx.x == 0) device::close_call(ctx);  // every thread read seq in read_call_seq
}

__global__ void __launch_bounds__(kMaxThreads)
    combine_recv_kernel(DeviceContext ctx, CombineRecvParams p) {
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden, me = ctx.rank, b = p.buffer;
  const int32_t slots_per_rank = ctx.local_experts * R * ctx.ll_capacity;
  const uint64_t seq = ctx.local.combine_seq[b];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __shared__ const uint16_t* y_of[detail::kMaxRanks];
  // Per warp: the token's valid (slot row, weight) pairs, compacted in k order.
  __shared__ const uint16_t* rows[kMaxWarps][detail::kMaxTopk];
  __shared__ float weights[kMaxWarps][detail::kMaxTopk];

  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (!transport::wait_signal(ctx, FlagKind::kCombineReady, d, seq, Phase::kCombineReady,
                                blockIdx.x)) {
      ok = false;
      continue;
    }
    const uint64_t* slot = transport::peer_region<uint64_t>(ctx, me, ctx.sym.peer_ptrs) +
                           ((kLlPeerPtrBase + b) * R + d) * detail::kPeerPtrs;
    y_of[d] = static_cast<const uint16_t*>(transport::resolve_address(ctx, d, slot[0]));
  }
  ok = __syncthreads_and(ok) != 0;

  const int warps = blockDim.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  const int n16 = H / kBf16PerVec;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * warps + warp; ok && t < p.num_tokens;
       t += stride) {
    const uint16_t* row = nullptr;
    float w = 0.0f;
    if (lane < K) {
      const int32_t sl = p.slot_of[t * K + lane];
      if (sl >= 0) {
        row = y_of[sl / slots_per_rank] + static_cast<int64_t>(sl % slots_per_rank) * H;
        w = p.topk_weights ? p.topk_weights[t * K + lane] : 1.0f;
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
    for (int c = lane; c < n16; c += kWarpSize) {
      float acc[kBf16PerVec] = {};
      for (int k0 = 0; k0 < n; k0 += kCombineBatch) {
        int4 v[kCombineBatch];
#pragma unroll
        for (int u = 0; u < kCombineBatch; ++u)
          if (k0 + u < n) v[u] = device::ld_peer_16(rows[warp][k0 + u] + c * kBf16PerVec);
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
    __syncwarp();  // the lists are rewritten for the next token
  }

  if (device::is_last_block(ctx)) {
    // Every owner learns its y has been read; y of this rank stays until every reader is done.
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      transport::signal(ctx, d, FlagKind::kCombineDone, seq);
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      transport::wait_signal(ctx, FlagKind::kCombineDone, d, seq, Phase::kCombineDone, blockIdx.x);
  }
}

void check_grid(int blocks, int threads, const char* kernel) {
  if (blocks < 1 || threads < kWarpSize || threads > kMaxThreads || threads % kWarpSize != 0)
    throw InvalidArgument(std::string(kernel) +
                          ": expected blocks >= 1 and threads a multiple of " +
                          std::to_string(kWarpSize) + " in " + std::to_string(kWarpSize) + ".." +
                          std::to_string(kMaxThreads) + ", got " + std::to_string(blocks) + " x " +
                          std::to_string(threads));
}

}  // namespace

void launch_dispatch_send(const DeviceContext& ctx, const DispatchSendParams& params, int blocks,
                          int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::dispatch_send_kernel");
  dispatch_send_kernel<<<blocks, threads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::dispatch_send_kernel");
}

void launch_dispatch_recv(const DeviceContext& ctx, const DispatchRecvParams& params,
                          cudaStream_t stream) {
  dispatch_recv_kernel<<<1, kRecvThreads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::dispatch_recv_kernel");
}

void launch_combine_send(const DeviceContext& ctx, const CombineSendParams& params,
                         cudaStream_t stream) {
  combine_send_kernel<<<1, kCombineSendThreads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::combine_send_kernel");
}

void launch_combine_recv(const DeviceContext& ctx, const CombineRecvParams& params, int blocks,
                         int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::combine_recv_kernel");
  combine_recv_kernel<<<blocks, threads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::combine_recv_kernel");
}

void preload_kernels() {
  cudaFuncAttributes attr;
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_send_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_recv_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_send_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_recv_kernel));
}

}  // namespace moecomm::ll
