// Helpers for GPU tests: device buffers, uploads/downloads, poisoning, and the "no CUDA device"
// skip. Every CUDA call is checked.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "moecomm/moecomm.hpp"

#define TEST_CUDA(expr)                                                                  \
  do {                                                                                   \
    cudaError_t tc_err_ = (expr);                                                        \
    if (tc_err_ != cudaSuccess) {                                                        \
      cudaGetLastError(); /* do not let later checks report this one again */            \
      throw std::runtime_error(std::string(#expr) + ": " + cudaGetErrorString(tc_err_)); \
    }                                                                                    \
  } while (0)

/// Skips the current test case where there is no CUDA device.
#define REQUIRE_GPU()                                     \
  do {                                                    \
    if (::moecomm::cuda_device_count() == 0) {            \
      ::moecomm::test::skip("no CUDA device");            \
      return;                                             \
    }                                                     \
  } while (0)

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
    if (n > 0) TEST_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T)));
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) {
    o.ptr_ = nullptr;
    o.n_ = 0;
  }
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
  void upload(const std::vector<T>& host) {
    if (host.size() != n_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    if (n_) TEST_CUDA(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
    TEST_CUDA(cudaDeviceSynchronize());  // pageable copies may still be in flight
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) TEST_CUDA(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  void poison(uint8_t byte = kPoison) {
    if (n_) TEST_CUDA(cudaMemset(ptr_, byte, n_ * sizeof(T)));
    TEST_CUDA(cudaDeviceSynchronize());  // rank streams do not wait for the legacy stream
  }
  /// A contiguous view with the given dtype and shape.
  TensorView view(DType dtype, std::initializer_list<int64_t> shape) const {
    int device = 0;
    TEST_CUDA(cudaGetDevice(&device));
    return TensorView::contiguous(ptr_, dtype, shape, device);
  }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

/// Copies `count` elements of T from a device view (contiguous) to the host.
template <typename T>
std::vector<T> download(const TensorView& v, int64_t count = -1) {
  const int64_t n = count < 0 ? v.numel() : count;
  std::vector<T> host(static_cast<size_t>(n));
  if (n <= 0) return host;
  const cudaError_t err = cudaMemcpy(host.data(), v.data, n * sizeof(T), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("download of " + std::to_string(n) + " elements from " +
                             v.describe() + " at " + std::to_string(reinterpret_cast<uintptr_t>(v.data)) +
                             ": " + cudaGetErrorString(err));
  }
  return host;
}

/// Fills the first `bytes` bytes of a device view with the poison byte.
inline void poison(const TensorView& v, int64_t bytes = -1) {
  const int64_t n = bytes < 0 ? static_cast<int64_t>(v.nbytes()) : bytes;
  if (n > 0 && v.data) TEST_CUDA(cudaMemset(v.data, kPoison, n));
  TEST_CUDA(cudaDeviceSynchronize());  // rank streams do not wait for the legacy stream
}

/// Number of elements that differ, and a description of the first few.
template <typename T>
int64_t count_mismatches(const std::vector<T>& got, const std::vector<T>& want,
                         std::string* first = nullptr) {
  int64_t bad = 0;
  const size_t n = std::min(got.size(), want.size());
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (bad == 0 && first)
        *first = "at " + std::to_string(i) + ": got " + std::to_string(+got[i]) + ", want " +
                 std::to_string(+want[i]);
      ++bad;
    }
  }
  bad += static_cast<int64_t>(got.size() > want.size() ? got.size() - want.size()
                                                       : want.size() - got.size());
  return bad;
}

}  // namespace moecomm::test
