// Every CUDA return code is checked; a failure becomes moecomm::CudaError naming the call. The
// one check macro of the project: the library, the Python bindings, ep_bench and the tests all
// use it (header-only, so that code outside the library can include it).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "moecomm/error.hpp"

namespace moecomm::detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
  cudaGetLastError();  // a non-sticky error must not be reported again by the next check
  throw CudaError(std::string(what) + " failed: " + cudaGetErrorName(err) + " (" +
                  cudaGetErrorString(err) + ") at " + file + ":" + std::to_string(line));
}

}  // namespace moecomm::detail

/// Checks a CUDA runtime call.
#define MOECOMM_CUDA_CHECK(expr)                                               \
  do {                                                                         \
    cudaError_t mc_err_ = (expr);                                              \
    if (mc_err_ != cudaSuccess)                                                \
      ::moecomm::detail::throw_cuda_error(mc_err_, #expr, __FILE__, __LINE__); \
  } while (0)

/// Checks the launch just made (configuration errors surface here).
#define MOECOMM_LAUNCH_CHECK(kernel_name)                                                         \
  do {                                                                                            \
    cudaError_t mc_err_ = cudaGetLastError();                                                     \
    if (mc_err_ != cudaSuccess)                                                                   \
      ::moecomm::detail::throw_cuda_error(mc_err_, "launch of " kernel_name, __FILE__, __LINE__); \
  } while (0)
