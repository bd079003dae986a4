#include "runtime/cuda_check.hpp"
#include "runtime/stream_warmup.hpp"

namespace moecomm::detail {

namespace {
__global__ void empty_kernel() {}
}  // namespace

void warm_up_stream(cudaStream_t stream) {
  empty_kernel<<<1, 1, 0, stream>>>();
  MOECOMM_LAUNCH_CHECK("empty_kernel");
  MOECOMM_CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace moecomm::detail
