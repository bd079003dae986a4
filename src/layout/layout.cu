#include "layout/layout.hpp"

#include <string>

#include "device/block.cuh"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "transport/signal.cuh"

namespace moecomm::layout {

using detail::DeviceContext;
using detail::DeviceErrorKind;
using detail::FlagKind;
using detail::Phase;

namespace {

constexpr int kBitmapThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kScanPrefetch = 8;                // words per lane in flight while scanning a row
constexpr size_t kBitmapSmemLimit = 48 * 1024;  // default dynamic shared memory per block
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int64_t load_expert(const TopkInput& topk, int64_t i) {
  return topk.is_i64 ? static_cast<const int64_t*>(topk.data)[i]
                     : static_cast<int64_t>(static_cast<const int32_t*>(topk.data)[i]);
}

// One warp per word of 32 tokens: it owns column w of every bitmap row, so it needs no atomics.
// The warp builds its column in shared memory (E words) and writes it out once.
__global__ void __launch_bounds__(kBitmapThreads)
    build_bitmaps_kernel(DeviceContext ctx, TopkInput topk, bool validate) {
  extern __shared__ uint32_t column_of_warp[];  // [warps][E]
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t T = topk.num_tokens;
  const int64_t used_words = (T + 31) / 32;
  if (w >= used_words) return;
  const int E = ctx.num_experts, L = ctx.local_experts, K = ctx.topk, R = ctx.num_ranks;
  const int W = ctx.words;
  const int64_t t = w * 32 + lane;
  const bool has_token = t < T;
  uint32_t* column = column_of_warp + static_cast<size_t>(threadIdx.x / 32) * E;

  for (int e = lane; e < E; e += 32) column[e] = 0;
  __syncwarp();

  uint64_t rank_mask = 0;
  for (int k = 0; k < K; ++k) {
    int64_t e = has_token ? load_expert(topk, t * K + k) : -1;
    if (e < -1 || e >= E) {
      transport::record_error(ctx, DeviceErrorKind::kExpertOutOfRange, -1, Phase::kNone, 0, 0, e, t,
                              k);
      e = -1;
    }
    if (validate && e >= 0) {
      for (int j = 0; j < k; ++j) {
        if (load_expert(topk, t * K + j) == e) {
          transport::record_error(ctx, DeviceErrorKind::kDuplicateExpert, -1, Phase::kNone, 0, 0, e,
                                  t, k);
          e = -1;
          break;
        }
      }
    }
    const unsigned same = __match_any_sync(kFullMask, static_cast<int>(e));
    if (e >= 0) {
      rank_mask |= 1ull << (e / L);
      // The lowest lane of each group of equal experts writes the group's bits; groups of one
      // k-step name distinct experts, and steps are ordered by __syncwarp.
      if (lane == __ffs(same) - 1) column[e] |= same;
    }
    __syncwarp();
  }
  for (int e = lane; e < E; e += 32)
    ctx.local.expert_bitmap[static_cast<int64_t>(e) * W + w] = column[e];
  if (has_token) ctx.local.token_rank_mask[t] = rank_mask;
  for (int r = 0; r < R; ++r) {
    const bool in_rank = (rank_mask >> r) & 1ull;
    const unsigned bits = __ballot_sync(kFullMask, in_rank);
    if (lane == 0) ctx.local.rank_bitmap[static_cast<int64_t>(r) * W + w] = bits;
    if (has_token) ctx.local.is_token_in_rank[t * R + r] = in_rank ? 1 : 0;
  }
}

// Exclusive prefix over the popcounts of one bitmap row; returns the row total (all lanes).
// Each lane loads kScanPrefetch words before the scan, so a row costs one load latency.
__device__ int32_t scan_row(const uint32_t* bits, int32_t* prefix, int64_t used_words, int lane) {
  int32_t running = 0;
  for (int64_t base = 0; base < used_words; base += 32 * kScanPrefetch) {
    uint32_t word[kScanPrefetch];
#pragma unroll
    for (int j = 0; j < kScanPrefetch; ++j) {
      const int64_t w = base + j * 32 + lane;
      word[j] = w < used_words ? bits[w] : 0u;
    }
#pragma unroll
    for (int j = 0; j < kScanPrefetch; ++j) {
      if (base + j * 32 >= used_words) break;  // warp-uniform
      const int64_t w = base + j * 32 + lane;
      const int32_t c = __popc(word[j]);
      int32_t inclusive = c;
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t v = __shfl_up_sync(kFullMask, inclusive, off);
        if (lane >= off) inclusive += v;
      }
      if (w < used_words) prefix[w] = running + inclusive - c;
      running += __shfl_sync(kFullMask, inclusive, 31);
    }
  }
  return running;
}

__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(DeviceContext ctx, int64_t T, ScanOptions opt) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int E = ctx.num_experts, R = ctx.num_ranks, L = ctx.local_experts, W = ctx.words;
  const int me = ctx.rank;
  const int64_t used_words = (T + 31) / 32;

  for (int row = warp; row < E + R; row += warps) {
    const bool expert = row < E;
    const int64_t r = expert ? row : row - E;
    const uint32_t* bits = (expert ? ctx.local.expert_bitmap : ctx.local.rank_bitmap) + r * W;
    int32_t* prefix = (expert ? ctx.local.expert_word_prefix : ctx.local.rank_word_prefix) + r * W;
    const int32_t total = scan_row(bits, prefix, used_words, lane);
    if (lane == 0)
      (expert ? ctx.local.num_tokens_per_expert : ctx.local.num_tokens_per_rank)[r] = total;
  }
  __syncthreads();

  if (opt.exchange_counts) {
    const int parity = static_cast<int>(seq & 1);
    // Put this rank's row of the count matrix, and its counts for each peer's experts, into
    // every peer; then signal.
    for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
      const int d = i / R, j = i % R;
      transport::peer_region<int32_t>(ctx, d, ctx.sym.count_matrix)[(parity * R + me) * R + j] =
          ctx.local.num_tokens_per_rank[j];
    }
    for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
      const int d = i / L, le = i % L;
      transport::peer_region<int32_t>(ctx, d, ctx.sym.expert_counts)[(parity * R + me) * L + le] =
          ctx.local.num_tokens_per_expert[d * L + le];
    }
    __syncthreads();
    if (threadIdx.x < R) {
      transport::scope(ctx).fence();
      transport::signal(ctx, threadIdx.x, FlagKind::kLayoutCounts, seq);
      transport::wait_signal(ctx, FlagKind::kLayoutCounts, threadIdx.x, seq, Phase::kLayoutCounts,
                             0);
    }
    __syncthreads();
    const int32_t* matrix =
        transport::peer_region<int32_t>(ctx, me, ctx.sym.count_matrix) + parity * R * R;
    const int32_t* per_expert =
        transport::peer_region<int32_t>(ctx, me, ctx.sym.expert_counts) + parity * R * L;
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      ctx.local.num_recv_per_rank[s] = matrix[s * R + me];
      int32_t base = 0;  // rows that lower ranks send to s come first there
      for (int q = 0; q < me; ++q) base += matrix[q * R + s];
      ctx.local.send_base[s] = base;
    }
    for (int le = threadIdx.x; le < L; le += blockDim.x) {
      int32_t sum = 0;
      for (int s = 0; s < R; ++s) sum += per_expert[s * L + le];
      ctx.local.num_recv_per_expert[le] = sum;
      if (opt.recv_per_expert_padded) {
        const int a = opt.expert_alignment;
        opt.recv_per_expert_padded[le] = (sum + a - 1) / a * a;
      }
    }
    if (threadIdx.x == 0) {
      int64_t total = 0;
      for (int s = 0; s < R; ++s) {
        if (opt.recv_rank_prefix) opt.recv_rank_prefix[s] = static_cast<int32_t>(total);
        total += matrix[s * R + me];
      }
      if (opt.recv_rank_prefix) opt.recv_rank_prefix[R] = static_cast<int32_t>(total);
      if (opt.num_recv) *opt.num_recv = static_cast<int32_t>(total);
      if (total > ctx.ht_capacity)
        transport::record_error(ctx, DeviceErrorKind::kRecvOverflow, -1, Phase::kNone, 0, seq, 0,
                                total, ctx.ht_capacity);
    }
    if (opt.host_flag) {
      __syncthreads();  // the padded counts above are written
      if (threadIdx.x == 0) {
        opt.host_counts[0] = opt.num_recv ? *opt.num_recv : 0;
        for (int le = 0; le < L; ++le)
          opt.host_counts[1 + le] = opt.recv_per_expert_padded ? opt.recv_per_expert_padded[le] : 0;
        __threadfence_system();
        *opt.host_flag = opt.token;
      }
    }
  }
  if (opt.close_call) {
    __syncthreads();
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

}  // namespace

void launch_build_bitmaps(const DeviceContext& ctx, const TopkInput& topk, bool validate,
                          cudaStream_t stream) {
  const int64_t words = (topk.num_tokens + 31) / 32;
  if (words == 0) return;
  // One column of E words per warp in shared memory; fewer warps per block for very large E.
  const size_t column_bytes = sizeof(uint32_t) * ctx.num_experts;
  int warps_per_block = kBitmapThreads / 32;
  while (warps_per_block > 1 && column_bytes * warps_per_block > kBitmapSmemLimit)
    warps_per_block /= 2;
  if (column_bytes > kBitmapSmemLimit)
    throw InvalidArgument("Config.num_experts: expected at most " +
                          std::to_string(kBitmapSmemLimit / sizeof(uint32_t)) + ", got " +
                          std::to_string(ctx.num_experts));
  const int blocks = static_cast<int>((words + warps_per_block - 1) / warps_per_block);
  build_bitmaps_kernel<<<blocks, warps_per_block * 32, column_bytes * warps_per_block, stream>>>(
      ctx, topk, validate);
  MOECOMM_LAUNCH_CHECK("build_bitmaps_kernel");
}

void launch_scan(const DeviceContext& ctx, int64_t num_tokens, const ScanOptions& options,
                 cudaStream_t stream) {
  scan_kernel<<<1, kScanThreads, 0, stream>>>(ctx, num_tokens, options);
  MOECOMM_LAUNCH_CHECK("scan_kernel");
}

void preload_kernels() {
  cudaFuncAttributes attr;
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, build_bitmaps_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, scan_kernel));
}

}  // namespace moecomm::layout
