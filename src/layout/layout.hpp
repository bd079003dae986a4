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

/// Kernel 1: bitmaps, token->rank masks, is_token_in_rank; range (always) and duplicate
/// (validate) checks, recorded as device errors (the bad entry is treated as -1).
void launch_build_bitmaps(const detail::DeviceContext& ctx, const TopkInput& topk, bool validate,
                          cudaStream_t stream);

struct ScanOptions {
  bool exchange_counts = false;  // send this rank's counts to every peer and receive theirs
  bool close_call = false;       // this kernel ends the call (advances the epoch)
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

/// Kernel 2 (one block): prefix counts over the bitmaps, per-rank / per-expert totals and, if
/// asked, the count exchange (which is also the "receive buffers are free" handshake of HT).
void launch_scan(const detail::DeviceContext& ctx, int64_t num_tokens, const ScanOptions& options,
                 cudaStream_t stream);

#ifdef __CUDACC__
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
