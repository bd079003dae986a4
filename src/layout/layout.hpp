// Routing layout on the GPU: from topk_idx, which ranks and experts each token goes to, the
// per-rank and per-expert counts, each token's position among the tokens bound for a rank or an
// expert (bitmaps of 32 tokens per word + prefix counts), and the count exchange among ranks.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "paths/device_context.hpp"

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
  // Without prefix: every block builds the expert bitmaps on its own, in its shared memory, so
  // that no block waits for another (no grid barrier, no bitmaps in global memory). Set by the
  // launch where block_bitmap_smem_bytes() says they fit.
  bool block_bitmaps = false;
};

/// Shared memory a block needs for its own copy of the expert bitmaps of `num_tokens` tokens.
size_t block_bitmap_smem_bytes(int num_experts, int64_t num_tokens);
/// Whether that copy fits in kColumnSmemLimit; where not, the layout builds the bitmaps in global
/// memory with every block, behind a grid barrier.
bool block_bitmaps_fit(int num_experts, int64_t num_tokens);

/// The layout alone: bitmaps, token->rank masks, is_token_in_rank, prefix counts, totals and,
/// if asked, the count exchange (which is also HT's "receive buffers are free" handshake). All
/// `blocks` blocks take part (they must be co-resident).
void launch_layout(const detail::DeviceContext& ctx, const LayoutParams& params, int blocks,
                   int threads, cudaStream_t stream);

/// Loads this file's kernels now. CUDA loads a kernel lazily at its first launch, and that load
/// may wait for the device to go idle, which never happens while co-located ranks spin on each
/// other: so every kernel is loaded when a communicator is built.
void preload_kernels();

}  // namespace moecomm::layout
