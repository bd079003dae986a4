// Every path's regions in one place: the list the runtime lays out without knowing what is in it.
#pragma once

#include "moecomm/config.hpp"
#include "paths/device_context.hpp"
#include "runtime/arena.hpp"

namespace moecomm::detail {

/// Appends the runtime's own regions, then the layout's, HT's and LL's, to the symmetric and
/// private arenas, and records where they went in `ctx`. The order is fixed, so every rank
/// computes the same symmetric offsets. Called twice per rank: once to measure (no base), once
/// to carve the private allocation.
void claim_regions(const Config& config, const RegionShape& shape, Arena& symmetric, Arena& local,
                   DeviceContext& ctx);

/// The symmetric buffer a group allocates for every rank: its size and the ranges to clear.
SymmetricPlan symmetric_plan(const Config& config, const RegionShape& shape);

}  // namespace moecomm::detail
