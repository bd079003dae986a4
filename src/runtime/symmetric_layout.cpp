#include "runtime/symmetric_layout.hpp"

#include <algorithm>

namespace moecomm::detail {

namespace {

/// Appends regions one after another, each aligned to 256 bytes.
class Arena {
 public:
  size_t take(size_t bytes) {
    const size_t at = offset_;
    offset_ += (bytes + 255) / 256 * 256;
    return at;
  }
  size_t size() const { return offset_; }

 private:
  size_t offset_ = 0;
};

}  // namespace

BufferSizes buffer_sizes(const Config& config, int num_ranks, bool separate_processes) {
  BufferSizes s;
  const bool ht = config.mode != Mode::kLowLatency;
  const bool ll = config.mode != Mode::kHighThroughput;
  s.ht_capacity = ht ? (config.max_recv_tokens > 0
                            ? config.max_recv_tokens
                            : static_cast<int64_t>(num_ranks) * config.max_tokens_per_rank)
                     : 0;
  s.ll_capacity = ll ? config.ll_capacity() : 0;
  s.max_tokens = std::max(config.max_tokens_per_rank, s.ll_capacity);
  s.fp8 = config.enable_fp8;
  s.stage_combine = separate_processes;
  return s;
}

SymmetricLayout symmetric_layout(const Config& config, int num_ranks, const BufferSizes& sizes) {
  const size_t R = static_cast<size_t>(num_ranks);
  const size_t L = static_cast<size_t>(config.local_experts(num_ranks));
  const size_t H = static_cast<size_t>(config.hidden);
  const size_t K = static_cast<size_t>(config.topk);
  const size_t groups = H / kFp8Group;
  Arena arena;
  SymmetricLayout lay{};
  lay.flags = arena.take(sizeof(uint64_t) * static_cast<size_t>(FlagKind::kCount) * kMaxRanks);
  lay.count_matrix = arena.take(sizeof(int32_t) * 2 * R * R);
  lay.expert_counts = arena.take(sizeof(int32_t) * 2 * R * L);
  lay.peer_ptrs = arena.take(sizeof(uint64_t) * 4 * R * kPeerPtrs);
  lay.ll_count_sig = arena.take(sizeof(uint64_t) * 2 * L * R);

  const size_t cap = static_cast<size_t>(sizes.ht_capacity);
  lay.ht_x = arena.take(cap * H * 2);  // bf16 rows; fp8 rows use the first half
  lay.ht_scales = arena.take(sizes.fp8 ? cap * groups * sizeof(float) : 0);
  lay.ht_topk_idx = arena.take(cap * K * sizeof(int64_t));
  lay.ht_topk_weights = arena.take(cap * K * sizeof(float));
  lay.ht_src_token = arena.take(cap * sizeof(int32_t));
  const size_t staged = sizes.stage_combine ? cap : 0;
  lay.ht_stage_y = arena.take(staged * H * 2);
  lay.ht_stage_weights = arena.take(staged * K * sizeof(float));

  const size_t slots = L * R * static_cast<size_t>(sizes.ll_capacity);
  for (int b = 0; b < 2; ++b) {
    lay.ll_x[b] = arena.take(slots * H * 2);
    lay.ll_scales[b] = arena.take(sizes.fp8 ? slots * groups * sizeof(float) : 0);
    lay.ll_src_token[b] = arena.take(slots * sizeof(int32_t));
    lay.ll_combine[b] = arena.take(slots * H * 2);
  }
  lay.total = arena.size();
  return lay;
}

}  // namespace moecomm::detail
