#include "routing.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "common/random.hpp"

namespace epb {
namespace {

constexpr int kGroupScoreExperts = 2;  // a group scores the sum of its best two experts

/// Gumbel(0, 1) noise: adding it to log-weights and keeping the K largest samples K items
/// without replacement in proportion to their weights.
double gumbel(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(std::numeric_limits<double>::min(), 1.0);
  return -std::log(-std::log(u(rng)));
}

}  // namespace

Router::Router(const RoutingSpec& spec, std::mt19937_64& rng) : spec_(spec) {
  if (spec.topk > spec.experts)
    throw std::invalid_argument("--topk " + std::to_string(spec.topk) + " exceeds --experts " +
                                std::to_string(spec.experts));
  if (spec.kind == RoutingKind::kZipf) {
    std::vector<int> order(spec.experts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);  // hot experts land on random ranks
    log_weight_.resize(spec.experts);
    for (int i = 0; i < spec.experts; ++i) log_weight_[order[i]] = -spec.zipf_s * std::log(i + 1.0);
  }
  if (spec.kind == RoutingKind::kGroup) {
    const int per_group = spec.experts / spec.ranks;
    const int needed = (spec.topk + per_group - 1) / per_group;
    groups_per_token_ = spec.topk_groups > 0 ? spec.topk_groups : std::max(spec.ranks / 2, needed);
    if (groups_per_token_ > spec.ranks || groups_per_token_ * per_group < spec.topk)
      throw std::invalid_argument("--topk-groups " + std::to_string(groups_per_token_) +
                                  ": expected at most " + std::to_string(spec.ranks) +
                                  " groups holding at least K = " + std::to_string(spec.topk) +
                                  " experts (" + std::to_string(per_group) + " per group)");
  }
}

std::vector<int64_t> Router::route(std::mt19937_64& rng, int64_t tokens) const {
  const int K = spec_.topk;
  if (spec_.kind == RoutingKind::kUniform)
    return moecomm::test::random_topk(rng, tokens, spec_.experts, K);
  std::vector<int64_t> idx(static_cast<size_t>(tokens) * K);
  for (int64_t t = 0; t < tokens; ++t) {
    if (spec_.kind == RoutingKind::kZipf)
      route_zipf(rng, &idx[t * K]);
    else
      route_group(rng, &idx[t * K]);
  }
  return idx;
}

void Router::top_k(std::vector<std::pair<double, int>>& keyed, int64_t* out) const {
  const int K = spec_.topk;
  std::partial_sort(keyed.begin(), keyed.begin() + K, keyed.end(), std::greater<>());
  for (int k = 0; k < K; ++k) out[k] = keyed[k].second;
}

void Router::route_zipf(std::mt19937_64& rng, int64_t* out) const {
  std::vector<std::pair<double, int>> keyed(spec_.experts);
  for (int e = 0; e < spec_.experts; ++e) keyed[e] = {log_weight_[e] + gumbel(rng), e};
  top_k(keyed, out);
}

void Router::route_group(std::mt19937_64& rng, int64_t* out) const {
  const int E = spec_.experts, G = spec_.ranks, per_group = E / G;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<double> score(E);
  for (double& s : score) s = u(rng);

  std::vector<std::pair<double, int>> group_score(G);
  for (int g = 0; g < G; ++g) {
    std::vector<double> mine(score.begin() + g * per_group, score.begin() + (g + 1) * per_group);
    const int best = std::min(kGroupScoreExperts, per_group);
    std::partial_sort(mine.begin(), mine.begin() + best, mine.end(), std::greater<>());
    group_score[g] = {std::accumulate(mine.begin(), mine.begin() + best, 0.0), g};
  }
  std::partial_sort(group_score.begin(), group_score.begin() + groups_per_token_, group_score.end(),
                    std::greater<>());

  std::vector<std::pair<double, int>> keyed;
  keyed.reserve(static_cast<size_t>(groups_per_token_) * per_group);
  for (int i = 0; i < groups_per_token_; ++i)
    for (int e = group_score[i].second * per_group; e < (group_score[i].second + 1) * per_group;
         ++e)
      keyed.push_back({score[e], e});
  top_k(keyed, out);
}

}  // namespace epb
