#include "layout/regions.hpp"

#include "runtime/arena.hpp"

namespace moecomm::layout {

Regions claim_regions(const detail::RegionShape& shape, detail::Arena& symmetric,
                      detail::Arena& local) {
  const size_t R = static_cast<size_t>(shape.num_ranks);
  const size_t E = static_cast<size_t>(shape.num_experts);
  const size_t L = static_cast<size_t>(shape.local_experts);
  const size_t W = static_cast<size_t>(shape.words);
  const size_t Tmax = static_cast<size_t>(shape.max_tokens);
  Regions r{};
  r.count_matrix = symmetric.offset<int32_t>(2 * R * R, /*zeroed=*/true);
  r.expert_counts = symmetric.offset<int32_t>(2 * R * L, /*zeroed=*/true);
  r.expert_bitmap = local.take<uint32_t>(E * W);
  r.expert_word_prefix = local.take<int32_t>(E * W);
  r.rank_bitmap = local.take<uint32_t>(R * W);
  r.rank_word_prefix = local.take<int32_t>(R * W);
  r.token_rank_mask = local.take<uint64_t>(Tmax);
  r.num_tokens_per_rank = local.take<int32_t>(R);
  r.num_tokens_per_expert = local.take<int32_t>(E);
  r.is_token_in_rank = local.take<uint8_t>(Tmax * R);
  r.num_recv_per_rank = local.take<int32_t>(R);
  r.num_recv_per_expert = local.take<int32_t>(L);
  r.send_base = local.take<int32_t>(R);
  return r;
}

}  // namespace moecomm::layout
