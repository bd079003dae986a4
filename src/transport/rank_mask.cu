#include "transport/rank_mask.hpp"

#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"

namespace moecomm::transport {

namespace {

__global__ void update_rank_mask_kernel(uint64_t* word, uint64_t set, uint64_t clear) {
  auto* w = reinterpret_cast<unsigned long long*>(word);
  atomicAnd(w, ~static_cast<unsigned long long>(clear));
  atomicOr(w, static_cast<unsigned long long>(set));
}

}  // namespace

void launch_update_rank_mask(uint64_t* word, uint64_t set, uint64_t clear, cudaStream_t stream) {
  update_rank_mask_kernel<<<1, 1, 0, stream>>>(word, set, clear);
  MOECOMM_LAUNCH_CHECK("transport::update_rank_mask_kernel");
}

void preload_rank_mask_kernel() {
  detail::preload_kernel(update_rank_mask_kernel);
}

}  // namespace moecomm::transport
