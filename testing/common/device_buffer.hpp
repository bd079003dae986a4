// An owning device allocation for tests and ep_bench: upload, download, poison, view. Every CUDA
// call is checked (MOECOMM_CUDA_CHECK throws moecomm::CudaError naming the call).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "moecomm/tensor.hpp"
#include "runtime/cuda_check.hpp"

namespace moecomm::test {

/// Byte written over outputs before a run: bf16 0xABAB / fp8 0xAB / i32 0xABABABAB are all
/// values no correct run produces by accident in every element.
inline constexpr uint8_t kPoison = 0xAB;

/// Owning device allocation of n elements of T on the current device.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n > 0) MOECOMM_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) {
    o.ptr_ = nullptr;
    o.n_ = 0;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = o.ptr_;
      n_ = o.n_;
      o.ptr_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  void upload(const std::vector<T>& host) {
    if (host.size() != n_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    if (n_)
      MOECOMM_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());  // pageable copies may still be in flight
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_)
      MOECOMM_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison(uint8_t byte = kPoison) {
    if (n_) MOECOMM_CUDA_CHECK(cudaMemset(ptr_, byte, n_ * sizeof(T)));
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());  // rank streams do not wait for the legacy stream
  }
  /// A contiguous view with the given dtype and shape.
  TensorView view(DType dtype, std::initializer_list<int64_t> shape) const {
    int device = 0;
    MOECOMM_CUDA_CHECK(cudaGetDevice(&device));
    return TensorView::contiguous(ptr_, dtype, shape, device);
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

}  // namespace moecomm::test
