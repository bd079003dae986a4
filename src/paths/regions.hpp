// Every path's regions in one place: the list the runtime lays out without knowing what is in it.
#pragma once

#include "moecomm/config.hpp"
#include "paths/device_context.hpp"
#include "runtime/arena.hpp"

namespace moecomm::detail {

/// The arenas one rank's regions are carved from. The symmetric buffer starts with the RDMA
/// window (Config::rdma_bytes; the only part that ranks on other nodes may write, through the
/// RDMA engine), then the rest. Without a window (rdma_bytes == 0), the regions a path would put
/// in it go to the symmetric arena.
struct RankArenas {
  explicit RankArenas(const Config& config, void* local_base = nullptr);
  Arena window;     // offsets from 0 (the window's start)
  Arena symmetric;  // offsets from the window's end
  Arena local;      // pointers into the rank's private allocation
  bool has_window;
  /// Where a region that remote nodes write goes.
  Arena& rdma() { return has_window ? window : symmetric; }
};

/// Appends the runtime's own regions, then the layout's, HT's, LL's and the internode path's, to
/// the arenas, and records where they went in `ctx`. The order is fixed, so every rank computes
/// the same symmetric offsets. Called twice per rank: once to measure (no base), once to carve
/// the private allocation. Raises InvalidArgument when a group spanning nodes has no window or
/// one smaller than it needs (naming the size it needs).
void claim_regions(const Config& config, const RegionShape& shape, RankArenas& arenas,
                   DeviceContext& ctx);

/// Window bytes the regions of `shape` take (Config::rdma_bytes ignored).
size_t window_bytes_needed(const Config& config, const RegionShape& shape);

/// The symmetric buffer a group allocates for every rank: its size and the ranges to clear.
SymmetricPlan symmetric_plan(const Config& config, const RegionShape& shape);

}  // namespace moecomm::detail
