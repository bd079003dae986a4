// Routing layout on the GPU: from topk_idx, which ranks and experts each token goes to, the
// per-rank and per-expert counts, each token's position among the tokens bound for a rank or an
// expert (bitmaps of 32 tokens per word + prefix counts), and the count exchange among ranks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/device_context.hpp"

namespace moecomm::layout {

struct TopkInput {
  const void* data = nullptr;  // [T, K]
  bool is_i64 = true;          // else i32
  int64_t num_tokens = 0;
};

struct ScanOptions {
  bool exchange_counts = false;  // send this rank's counts to every peer and receive theirs
  bool close_call = false;       // the layout kernel ends the call (advances the epoch)
  bool check_capacity = false;   // HT dispatch: raise on every rank if any receiver overflows
  int expert_alignment = 1;
  // Written when exchange_counts (may be null):
  int32_t* recv_rank_prefix = nullptr;        // [R + 1]
  int32_t* recv_per_expert_padded = nullptr;  // [L]
  int32_t* num_recv = nullptr;                // [1]
  // Exact sizing: the counts are also written straight into mapped host memory, then `token` into
  // host_flag, so that the host learns N by polling memory (no CUDA call, no lock held while it
  // waits). Written even after a failed wait, so that the host always wakes up.
  int32_t* host_counts = nullptr;  // [1 + L]: N, padded per-expert counts
  volatile uint64_t* host_flag = nullptr;
  uint64_t token = 0;
};

/// What the layout steps need: the routing, whether to check it for repeats (range is always
/// checked; a bad entry is recorded as a device error and treated as -1), and the scan options.
struct LayoutParams {
  TopkInput topk;
  bool validate = false;
  bool prefix = true;  // prefix counts and totals; LL reads positions off the bitmap words instead
  ScanOptions scan;    // (with prefix)
};

/// Largest dynamic shared memory the bitmap columns of one block may take.
inline constexpr size_t kColumnSmemLimit = 48 * 1024;

/// Warps of a block of `warps` that build bitmap columns: each needs E words of shared memory.
#ifdef __CUDACC__
__host__ __device__
#endif
    inline int
    column_warps(int num_experts, int warps) {
  const size_t column = sizeof(uint32_t) * static_cast<size_t>(num_experts);
  const size_t fit = column > 0 ? kColumnSmemLimit / column : 1;
  const int n = fit < static_cast<size_t>(warps) ? static_cast<int>(fit) : warps;
  return n > 0 ? n : 1;
}

/// Dynamic shared memory a kernel that runs the layout steps needs per block.
inline size_t column_smem_bytes(int num_experts, int threads) {
  return sizeof(uint32_t) * static_cast<size_t>(num_experts) *
         static_cast<size_t>(column_warps(num_experts, threads / 32));
}

/// The layout alone: bitmaps, token->rank masks, is_token_in_rank, prefix counts, totals and,
/// if asked, the count exchange (which is also HT's "receive buffers are free" handshake). All
/// `blocks` blocks take part (they must be co-resident).
void launch_layout(const detail::DeviceContext& ctx, const LayoutParams& params, int blocks,
                   int threads, cudaStream_t stream);

#ifdef __CUDACC__
/// Position of token t among the tokens whose bit is set in `bitmap`, from the words alone (no
/// prefix counts): cheap while rows are short (LL: T <= M tokens).
__device__ __forceinline__ int32_t bitmap_rank(const uint32_t* bitmap, int64_t t) {
  const int64_t w = t >> 5;
  int32_t n = __popc(bitmap[w] & ((1u << (t & 31)) - 1u));
  for (int64_t i = 0; i < w; ++i) n += __popc(bitmap[i]);
  return n;
}

/// Tokens whose bit is set in the first `used_words` words of `bitmap`.
__device__ __forceinline__ int32_t bitmap_count(const uint32_t* bitmap, int64_t used_words) {
  int32_t n = 0;
  for (int64_t i = 0; i < used_words; ++i) n += __popc(bitmap[i]);
  return n;
}

/// Device helper for consumers: position of token t among this rank's tokens whose bit is set in
/// `bitmap` (a row of W words), given that row's exclusive word prefix.
__device__ __forceinline__ int32_t bitmap_position(const uint32_t* bitmap, const int32_t* prefix,
                                                   int64_t t) {
  const int64_t w = t >> 5;
  const uint32_t below = (1u << (t & 31)) - 1u;
  return prefix[w] + __popc(bitmap[w] & below);
}
#endif

/// Loads this file's kernels now. CUDA loads a kernel lazily at its first launch, and that load
/// may wait for the device to go idle, which never happens while co-located ranks spin on each
/// other: so every kernel is loaded when a communicator is built.
void preload_kernels();

}  // namespace moecomm::layout
