// Small helpers shared by ep_bench's files: checked CUDA calls (MOECOMM_CUDA_CHECK, the library's
// own), an owning device buffer, a parallel loop over host data and the deterministic value
// generator of the test inputs.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/device_buffer.hpp"
#include "runtime/cuda_check.hpp"

namespace epb {

/// The device results differ from the host reference: no figure may be printed.
class VerificationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Device allocations: the one tests use too.
using moecomm::test::DeviceBuffer;

/// Runs fn(i) for i in [0, n) on all host cores (static chunks; fn must be thread-safe).
template <typename Fn>
void host_parallel_for(int64_t n, Fn fn) {
  const int64_t workers =
      std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, std::max<int64_t>(n, 1));
  std::vector<std::thread> threads;
  for (int64_t w = 0; w < workers; ++w)
    threads.emplace_back([=] {
      for (int64_t i = n * w / workers; i < n * (w + 1) / workers; ++i) fn(i);
    });
  for (auto& t : threads) t.join();
}

/// SplitMix64: a counter-based generator, so any element of any input is reproducible alone.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

/// bf16 bits of a value in [-4, 4) determined by (key, index); exact in f32, then truncated.
inline uint16_t hashed_bf16(uint64_t key, uint64_t index) {
  constexpr float kSpan = 8.0f, kLow = -4.0f, kUnit = 1.0f / 16777216.0f;  // 2^-24
  const uint64_t h = mix64(key ^ mix64(index));
  const float f = static_cast<float>(h >> 40) * kUnit * kSpan + kLow;
  uint32_t bits;
  __builtin_memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

/// Fills v with hashed_bf16(key, first_index + i), in parallel.
inline void fill_hashed_bf16(std::vector<uint16_t>& v, uint64_t key, uint64_t first_index = 0) {
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = static_cast<int64_t>(v.size());
  host_parallel_for((n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) v[i] = hashed_bf16(key, first_index + i);
  });
}

inline int64_t round_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

/// Copies n elements of T from device memory to the host.
template <typename T>
std::vector<T> download(const void* device_ptr, size_t n) {
  std::vector<T> host(n);
  if (n > 0)
    MOECOMM_CUDA_CHECK(cudaMemcpy(host.data(), device_ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

/// Throws VerificationError unless got[i] and want[i] are bitwise equal for every i < n; the
/// message names `what`, the first differing index and the number of differences.
template <typename T>
void expect_equal(const std::string& what, const T* got, const T* want, size_t n) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i)
    if (__builtin_memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  if (bad == 0) return;
  throw VerificationError(what + ": " + std::to_string(bad) + " of " + std::to_string(n) +
                          " elements differ from the host reference; first at index " +
                          std::to_string(first) + " (got " + std::to_string(+got[first]) +
                          ", want " + std::to_string(+want[first]) + ")");
}

template <typename T>
void expect_equal(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    throw VerificationError(what + ": " + std::to_string(got.size()) + " elements, want " +
                            std::to_string(want.size()));
  expect_equal(what, got.data(), want.data(), got.size());
}

/// The command line of the small tools (launch_floor, hbm_mix): `[--device D]`. Returns the device,
/// or -1 after printing the usage line for anything else.
inline int parse_device_option(int argc, char** argv, const char* tool) {
  int device = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--device" && i + 1 < argc) {
      device = std::stoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--device D]\n", tool);
      return -1;
    }
  }
  return device;
}

}  // namespace epb
