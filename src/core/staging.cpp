#include "core/staging.hpp"

#include "runtime/cuda_check.hpp"

namespace moecomm::detail {

CallStaging::~CallStaging() {
  for (void* p : temps_) cudaFreeAsync(p, stream_);
}

void* CallStaging::allocate(size_t bytes) {
  void* p = nullptr;
  MOECOMM_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream_));  // 256-byte aligned
  temps_.push_back(p);
  return p;
}

const void* CallStaging::input(const TensorView& v) {
  if (is_vector_aligned(v.data) || v.nbytes() == 0) return v.data;
  void* p = allocate(v.nbytes());
  MOECOMM_CUDA_CHECK(cudaMemcpyAsync(p, v.data, v.nbytes(), cudaMemcpyDeviceToDevice, stream_));
  return p;
}

void* CallStaging::output(const TensorView& v) {
  if (is_vector_aligned(v.data) || v.nbytes() == 0) return v.data;
  void* p = allocate(v.nbytes());
  copies_.push_back({v.data, p, v.nbytes()});
  return p;
}

void CallStaging::finish(cudaStream_t stream) {
  const cudaStream_t s = stream ? stream : stream_;
  for (const CopyOut& c : copies_)
    MOECOMM_CUDA_CHECK(cudaMemcpyAsync(c.to, c.from, c.bytes, cudaMemcpyDeviceToDevice, s));
  copies_.clear();
  for (void* p : temps_) MOECOMM_CUDA_CHECK(cudaFreeAsync(p, s));
  temps_.clear();
}

}  // namespace moecomm::detail
