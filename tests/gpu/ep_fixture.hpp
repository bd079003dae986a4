// Inputs of one EP test case: per-rank routing and payload on the host (for the reference) and
// on the device (for the communicator), generated from the printed seed.
#pragma once

#include <random>
#include <string>
#include <vector>

#include "common/random.hpp"
#include "gpu/gpu_common.hpp"
#include "reference/reference.hpp"

namespace moecomm::test {

/// How tokens pick their experts.
enum class Routing {
  kUniform,         // K distinct experts, uniform
  kWithDrops,       // uniform, ~25% of entries -1 (and some rows all -1)
  kOneExpert,       // every token picks expert `hot` (K = 1) or hot plus others
  kFirstRanksOnly,  // experts only on the first half of the ranks: the others receive nothing
};

inline const char* routing_name(Routing r) {
  switch (r) {
    case Routing::kUniform:
      return "uniform";
    case Routing::kWithDrops:
      return "drops";
    case Routing::kOneExpert:
      return "one-expert";
    case Routing::kFirstRanksOnly:
      return "first-ranks";
  }
  return "?";
}

/// topk_idx [T*K] for one rank.
inline std::vector<int64_t> make_topk(std::mt19937_64& rng, int64_t T, int E, int K, int R,
                                      Routing kind) {
  switch (kind) {
    case Routing::kUniform:
      return random_topk(rng, T, E, K);
    case Routing::kWithDrops: {
      auto idx = random_topk(rng, T, E, K, 0.25);
      for (int64_t t = 0; t < T; t += 7)
        for (int k = 0; k < K; ++k) idx[t * K + k] = -1;
      return idx;
    }
    case Routing::kOneExpert: {
      // Expert 1 for every token, the rest (if K > 1) distinct others.
      auto idx = random_topk(rng, T, E, K);
      for (int64_t t = 0; t < T; ++t) {
        for (int k = 0; k < K; ++k)
          if (idx[t * K + k] == 1) idx[t * K + k] = idx[t * K];
        idx[t * K] = 1;
      }
      return idx;
    }
    case Routing::kFirstRanksOnly: {
      const int L = E / R, usable = std::max(1, R / 2) * L;
      const int k_eff = std::min(K, usable);
      auto part = random_topk(rng, T, usable, k_eff);
      std::vector<int64_t> idx(static_cast<size_t>(T) * K, -1);
      for (int64_t t = 0; t < T; ++t)
        for (int k = 0; k < k_eff; ++k) idx[t * K + k] = part[t * k_eff + k];
      return idx;
    }
  }
  return {};
}

/// One rank's inputs on host and device.
struct RankInput {
  ref::Routing routing;
  std::vector<uint16_t> x;     // [T*H] bf16
  std::vector<float> weights;  // [T*K]
  DeviceBuffer<uint16_t> d_x;
  DeviceBuffer<int64_t> d_idx;
  DeviceBuffer<int32_t> d_idx32;
  DeviceBuffer<float> d_weights;

  TensorView x_view(int H) const { return d_x.view(DType::kBF16, {routing.num_tokens, H}); }
  TensorView idx_view(int K, bool i32 = false) const {
    return i32 ? d_idx32.view(DType::kI32, {routing.num_tokens, K})
               : d_idx.view(DType::kI64, {routing.num_tokens, K});
  }
  TensorView weights_view(int K) const {
    return d_weights.view(DType::kF32, {routing.num_tokens, K});
  }
};

inline std::vector<RankInput> make_inputs(std::mt19937_64& rng, const std::vector<int64_t>& tokens,
                                          int E, int K, int H, Routing kind) {
  const int R = static_cast<int>(tokens.size());
  std::vector<RankInput> in(R);
  for (int r = 0; r < R; ++r) {
    const int64_t T = tokens[r];
    in[r].routing.num_tokens = T;
    in[r].routing.topk_idx = make_topk(rng, T, E, K, R, kind);
    in[r].x = random_bf16(rng, static_cast<size_t>(T) * H);
    in[r].weights = random_f32(rng, static_cast<size_t>(T) * K, 0.0f, 1.0f);
    in[r].d_x = DeviceBuffer<uint16_t>(in[r].x);
    in[r].d_idx = DeviceBuffer<int64_t>(in[r].routing.topk_idx);
    std::vector<int32_t> i32(in[r].routing.topk_idx.begin(), in[r].routing.topk_idx.end());
    in[r].d_idx32 = DeviceBuffer<int32_t>(i32);
    in[r].d_weights = DeviceBuffer<float>(in[r].weights);
  }
  return in;
}

inline std::vector<ref::Routing> routings(const std::vector<RankInput>& in) {
  std::vector<ref::Routing> r;
  for (const auto& i : in) r.push_back(i.routing);
  return r;
}

/// A Config for tests: small SM budgets so that 8 ranks fit on any GPU.
inline Config test_config(Mode mode, int E, int K, int H, int max_tokens) {
  Config c;
  c.mode = mode;
  c.num_experts = E;
  c.topk = K;
  c.hidden = H;
  c.max_tokens_per_rank = max_tokens;
  c.num_sms = 4;
  c.threads_per_block = 256;
  c.timeout_seconds = 20.0;
  c.validate_inputs = true;
  c.enable_fp8 = H % 128 == 0;
  return c;
}

}  // namespace moecomm::test
