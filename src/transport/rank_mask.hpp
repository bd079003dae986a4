// Host side of rank masking: the mask word every kernel of a rank reads (transport/signal.cuh:
// masked_peers) is changed in stream order, so that a change applies from the next call on.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace moecomm::transport {

/// Enqueues `*word = (*word & ~clear) | set` on `stream` (atomic: a running wait may set bits).
void launch_update_rank_mask(uint64_t* word, uint64_t set, uint64_t clear, cudaStream_t stream);

/// Loads this file's kernel now (see ll::preload_kernels for why).
void preload_rank_mask_kernel();

}  // namespace moecomm::transport
