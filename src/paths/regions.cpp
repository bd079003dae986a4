#include "paths/regions.hpp"

#include <string>

#include "moecomm/error.hpp"
#include "runtime/node_layout.hpp"

namespace moecomm::detail {

RankArenas::RankArenas(const Config& config, void* local_base)
    : window(Arena::at_offset(0)),
      symmetric(symmetric_arena(config)),
      local(local_base),
      has_window(config.rdma_bytes > 0) {}

namespace {

void claim_all(const Config& config, const RegionShape& shape, RankArenas& a, DeviceContext& ctx) {
  claim_common_regions(a.symmetric, a.local, ctx);
  ctx.layout = layout::claim_regions(shape, a.rdma(), a.local);
  ctx.ht = ht::claim_regions(config, shape, a.symmetric);
  ctx.ll = ll::claim_regions(config, shape, a.rdma(), a.local);
  ctx.internode = internode::claim_regions(config, shape, a.rdma(), a.local);
}

}  // namespace

size_t window_bytes_needed(const Config& config, const RegionShape& shape) {
  Config c = config;
  c.rdma_bytes = int64_t{1} << 60;  // room for anything: only the window's use is measured
  RankArenas arenas(c);
  DeviceContext ctx{};
  claim_all(c, shape, arenas, ctx);
  return arenas.window.size();
}

void claim_regions(const Config& config, const RegionShape& shape, RankArenas& arenas,
                   DeviceContext& ctx) {
  if (shape.num_nodes > 1 && config.rdma_bytes == 0)
    throw InvalidArgument("Config.rdma_bytes: the group spans " + std::to_string(shape.num_nodes) +
                          " nodes, which needs an RDMA window of at least " +
                          std::to_string(window_bytes_needed(config, shape)) +
                          " bytes per rank (required_rdma_bytes), got 0 (intranode only)");
  claim_all(config, shape, arenas, ctx);
  if (arenas.has_window && arenas.window.size() > static_cast<size_t>(config.rdma_bytes))
    throw InvalidArgument(
        "Config.rdma_bytes: expected at least " + std::to_string(arenas.window.size()) +
        " bytes per rank for " + std::to_string(shape.num_ranks) + " ranks on " +
        std::to_string(shape.num_nodes) + " node(s) with this Config (required_rdma_bytes), got " +
        std::to_string(config.rdma_bytes));
  ctx.rdma.window_bytes = static_cast<uint64_t>(config.rdma_bytes);
}

SymmetricPlan symmetric_plan(const Config& config, const RegionShape& shape) {
  RankArenas arenas(config);
  DeviceContext ctx{};
  claim_regions(config, shape, arenas, ctx);
  SymmetricPlan plan;
  plan.window_bytes = static_cast<size_t>(config.rdma_bytes);
  plan.bytes = arenas.symmetric.size();
  // The window is cleared whole: what lies in it depends on the node count, which a process
  // group learns only when it connects.
  if (plan.window_bytes > 0) plan.zeroed.push_back({0, plan.window_bytes});
  for (const ByteRange& z : arenas.symmetric.zeroed()) plan.zeroed.push_back(z);
  return plan;
}

}  // namespace moecomm::detail

namespace moecomm {

// Host code only (no device is needed to size a group): the window the regions of the group's
// shape take, with the Config's own rdma_bytes ignored.
int64_t required_rdma_bytes(const Config& config, int num_ranks, int num_nodes) {
  Config c = config;
  c.rdma_bytes = 0;
  c.validate(num_ranks);
  detail::check_node_count(num_ranks, num_nodes);
  const auto shape = detail::region_shape(c, num_ranks, /*separate_processes=*/false, num_nodes);
  return static_cast<int64_t>(detail::window_bytes_needed(c, shape));
}

}  // namespace moecomm
