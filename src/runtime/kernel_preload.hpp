// Loading a kernel before its first launch, so that no timed or captured call pays for the module
// load (and a kernel that needs more than 48 KB of dynamic shared memory may have it).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "runtime/cuda_check.hpp"

namespace moecomm::detail {

/// Loads `kernel`; with `dynamic_smem` > 0 it may then launch with up to that many bytes of
/// dynamic shared memory.
template <typename Kernel>
void preload_kernel(Kernel* kernel, size_t dynamic_smem = 0) {
  const void* entry = reinterpret_cast<const void*>(kernel);
  cudaFuncAttributes attr;
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, entry));
  if (dynamic_smem > 0)
    MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(entry, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(dynamic_smem)));
}

}  // namespace moecomm::detail
