// Expert choices (topk_idx) of the benchmark's tokens: uniform, Zipf-skewed, or group-limited.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "options.hpp"

namespace epb {

struct RoutingSpec {
  RoutingKind kind = RoutingKind::kUniform;
  int experts = 0;      ///< E
  int topk = 0;         ///< K
  int ranks = 0;        ///< R: expert groups of the group routing are the ranks' expert ranges
  double zipf_s = 1.0;  ///< Zipf exponent
  int topk_groups = 0;  ///< group routing: groups per token (0: R / 2, at least enough for K)
};

/// Draws K distinct experts per token.
///  - uniform: every expert equally likely (testing/common/random.hpp's random_topk);
///  - zipf: expert of popularity rank i (a seeded random permutation) weighs 1 / (i + 1)^s;
///    K experts are drawn without replacement in proportion to their weight (Gumbel top-K);
///  - group: DeepSeek-V3 style group-limited routing. Every expert gets a random score; a group
///    (one rank's experts) scores the sum of its best two; the token keeps the best
///    `topk_groups` groups and the K best experts inside them.
class Router {
 public:
  Router(const RoutingSpec& spec, std::mt19937_64& rng);
  /// topk_idx [tokens * K] of one rank, in descending score order per token.
  std::vector<int64_t> route(std::mt19937_64& rng, int64_t tokens) const;
  /// Groups per token of the group routing (after defaults).
  int groups_per_token() const { return groups_per_token_; }

 private:
  void top_k(std::vector<std::pair<double, int>>& keyed, int64_t* out) const;
  void route_zipf(std::mt19937_64& rng, int64_t* out) const;
  void route_group(std::mt19937_64& rng, int64_t* out) const;

  RoutingSpec spec_;
  std::vector<double> log_weight_;  ///< zipf: log popularity of each expert
  int groups_per_token_ = 0;
};

}  // namespace epb
