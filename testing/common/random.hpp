// Seeded random inputs for tests and benchmarks (deterministic for a given seed).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace moecomm::test {

/// Distinct experts per token, uniform over [0, E); a fraction `drop` of entries set to -1.
inline std::vector<int64_t> random_topk(std::mt19937_64& rng, int64_t T, int E, int K,
                                        double drop = 0.0) {
  std::vector<int64_t> idx(static_cast<size_t>(T) * K);
  std::vector<int> pool(E);
  std::iota(pool.begin(), pool.end(), 0);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t t = 0; t < T; ++t) {
    // Partial Fisher-Yates: K distinct experts.
    for (int k = 0; k < K; ++k) {
      std::uniform_int_distribution<int> pick(k, E - 1);
      std::swap(pool[k], pool[pick(rng)]);
      idx[t * K + k] = pool[k];
    }
    for (int k = 0; k < K; ++k)
      if (drop > 0 && u(rng) < drop) idx[t * K + k] = -1;
  }
  return idx;
}

/// Random bf16 bit patterns of finite values in about [-4, 4].
inline std::vector<uint16_t> random_bf16(std::mt19937_64& rng, size_t n) {
  std::vector<uint16_t> v(n);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (auto& x : v) {
    float f = u(rng);
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    x = static_cast<uint16_t>(bits >> 16);  // truncation is fine for random data
  }
  return v;
}

inline std::vector<float> random_f32(std::mt19937_64& rng, size_t n, float lo = 0.0f,
                                     float hi = 1.0f) {
  std::vector<float> v(n);
  std::uniform_real_distribution<float> u(lo, hi);
  for (auto& x : v) x = u(rng);
  return v;
}

}  // namespace moecomm::test
