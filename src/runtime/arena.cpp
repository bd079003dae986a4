#include "runtime/arena.hpp"

#include <algorithm>

namespace moecomm::detail {

RegionShape region_shape(const Config& config, int num_ranks, bool separate_processes,
                         int num_nodes) {
  RegionShape s;
  s.num_ranks = num_ranks;
  s.num_experts = config.num_experts;
  s.local_experts = config.local_experts(num_ranks);
  s.topk = config.topk;
  s.hidden = config.hidden;
  const int ll_tokens = config.mode != Mode::kHighThroughput ? config.ll_capacity() : 0;
  s.max_tokens = std::max(config.max_tokens_per_rank, ll_tokens);
  s.words = static_cast<int>((static_cast<int64_t>(s.max_tokens) + 31) / 32);  // no int wrap
  s.separate_processes = separate_processes;
  s.num_nodes = num_nodes;
  s.node_size = num_nodes > 0 ? num_ranks / num_nodes : 0;
  return s;
}

void claim_common_regions(Arena& symmetric, Arena& local, RankContext& ctx) {
  ctx.sym.flags = symmetric.offset<uint64_t>(static_cast<size_t>(FlagKind::kCount) * kMaxRanks,
                                             /*zeroed=*/true);
  ctx.local.epoch = local.take<uint64_t>(1);
  ctx.local.ticket = local.take<uint32_t>(1);
  ctx.local.work_queue = local.take<uint32_t>(1);
  ctx.local.grid_barrier = local.take<uint64_t>(2);
  ctx.local.aborted = local.take<int32_t>(1);
  ctx.local.rank_mask = local.take<uint64_t>(1);
  ctx.local.trace = local.take<uint64_t>(2 * kTraceMarks);
  ctx.rdma.nic_busy_until = local.take<uint64_t>(1);
}

}  // namespace moecomm::detail
