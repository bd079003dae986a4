#include "ht/regions.hpp"

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"

namespace moecomm::ht {

Regions claim_regions(const Config& config, const detail::RegionShape& shape,
                      detail::Arena& symmetric) {
  const size_t R = static_cast<size_t>(shape.num_ranks);
  const size_t H = static_cast<size_t>(shape.hidden);
  const size_t K = static_cast<size_t>(shape.topk);
  const size_t groups = H / detail::kFp8Group;
  Regions r{};
  const bool used = config.mode != Mode::kLowLatency;
  r.capacity = used ? (config.max_recv_tokens > 0
                           ? config.max_recv_tokens
                           : static_cast<int64_t>(shape.num_ranks) * config.max_tokens_per_rank)
                    : 0;
  r.stage_rows = shape.separate_processes ? r.capacity : 0;
  r.peer_ptrs = symmetric.offset<uint64_t>(2 * R * detail::kPeerPtrs, /*zeroed=*/true);
  const size_t cap = static_cast<size_t>(r.capacity);
  r.x = symmetric.offset<uint16_t>(cap * H);  // bf16 rows; fp8 rows use the first half
  r.scales = symmetric.offset<float>(config.enable_fp8 ? cap * groups : 0);
  r.topk_idx = symmetric.offset<int64_t>(cap * K);
  r.topk_weights = symmetric.offset<float>(cap * K);
  r.src_token = symmetric.offset<int32_t>(cap);
  const size_t staged = static_cast<size_t>(r.stage_rows);
  r.stage_y = symmetric.offset<uint16_t>(staged * H);
  r.stage_weights = symmetric.offset<float>(staged * K);
  return r;
}

}  // namespace moecomm::ht
