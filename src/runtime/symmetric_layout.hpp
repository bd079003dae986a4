// Where each region lies inside a rank's symmetric buffer, from the Config and the group size.
#pragma once

#include "moecomm/config.hpp"
#include "runtime/device_context.hpp"

namespace moecomm::detail {

/// Sizes derived from a Config for a group of `num_ranks`.
struct BufferSizes {
  int64_t ht_capacity = 0;  // HT receive rows (0 when HT is not used)
  int ll_capacity = 0;      // LL M (0 when LL is not used)
  int max_tokens = 0;       // largest T of any call (layout scratch)
  bool fp8 = false;
  bool stage_combine = false;  // ranks in separate processes: combine inputs must be registered
};

BufferSizes buffer_sizes(const Config& config, int num_ranks, bool separate_processes);

/// Offsets of every region; all 256-byte aligned. Regions of a path that is not used are empty.
SymmetricLayout symmetric_layout(const Config& config, int num_ranks, const BufferSizes& sizes);

}  // namespace moecomm::detail
