// Helpers for GPU tests: device buffers, uploads/downloads, poisoning, and the "no CUDA device"
// skip. Every CUDA call is checked.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/device_buffer.hpp"
#include "common/harness.hpp"
#include "moecomm/moecomm.hpp"

/// Skips the current test case where there is no CUDA device.
#define REQUIRE_GPU()                          \
  do {                                         \
    if (::moecomm::cuda_device_count() == 0) { \
      ::moecomm::test::skip("no CUDA device"); \
      return;                                  \
    }                                          \
  } while (0)

namespace moecomm::test {

/// Copies `count` elements of T from a device view (contiguous) to the host.
template <typename T>
std::vector<T> download(const TensorView& v, int64_t count = -1) {
  const int64_t n = count < 0 ? v.numel() : count;
  std::vector<T> host(static_cast<size_t>(n));
  if (n <= 0) return host;
  const cudaError_t err = cudaMemcpy(host.data(), v.data, n * sizeof(T), cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("download of " + std::to_string(n) + " elements from " + v.describe() +
                             " at " + std::to_string(reinterpret_cast<uintptr_t>(v.data)) + ": " +
                             cudaGetErrorString(err));
  }
  return host;
}

/// Fills the first `bytes` bytes of a device view with the poison byte.
inline void poison(const TensorView& v, int64_t bytes = -1) {
  const int64_t n = bytes < 0 ? static_cast<int64_t>(v.nbytes()) : bytes;
  if (n > 0 && v.data) MOECOMM_CUDA_CHECK(cudaMemset(v.data, kPoison, n));
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());  // rank streams do not wait for the legacy stream
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

/// Every phase of a call is recorded, in order, not before `not_before` (when the rank's previous
/// call closed; the global timer may tick coarsely); `received` only with `receive_phase`.
inline void check_trace_order(const CallTrace& t, uint64_t not_before, bool receive_phase,
                              const std::string& what) {
  CHECK(t.first_block_start > 0) << what << ": first block start";
  CHECK(t.first_block_start >= not_before) << what << ": first block start before the last call";
  CHECK(t.first_block_start <= t.last_block_start) << what << ": last block start";
  CHECK(t.last_block_start <= t.opened) << what << ": opened";
  CHECK(t.opened <= t.streamed) << what << ": streamed";
  CHECK(t.streamed <= t.closed) << what << ": closed";
  if (receive_phase)
    CHECK(t.closed <= t.received) << what << ": received";
  else
    CHECK(t.received == 0) << what << ": received (no receive phase)";
}

}  // namespace moecomm::test
