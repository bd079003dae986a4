#include "paths/regions.hpp"

namespace moecomm::detail {

void claim_regions(const Config& config, const RegionShape& shape, Arena& symmetric, Arena& local,
                   DeviceContext& ctx) {
  claim_common_regions(symmetric, local, ctx);
  ctx.layout = layout::claim_regions(shape, symmetric, local);
  ctx.ht = ht::claim_regions(config, shape, symmetric);
  ctx.ll = ll::claim_regions(config, shape, symmetric, local);
}

SymmetricPlan symmetric_plan(const Config& config, const RegionShape& shape) {
  Arena symmetric, local;
  DeviceContext ctx{};
  claim_regions(config, shape, symmetric, local, ctx);
  return {symmetric.size(), symmetric.zeroed()};
}

}  // namespace moecomm::detail
