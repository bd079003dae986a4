// The memory the high-throughput path needs in every rank's symmetric buffer: the receive rows
// (token-major, `capacity` rows), the addresses a combine publishes, and (process groups) the
// staging copies of combine inputs that are not registered memory. HT has no private regions.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"

namespace moecomm::ht {

struct Regions {
  int64_t capacity;    // receive rows (0 when the communicator does not serve HT)
  int64_t stage_rows;  // rows of the staging regions (0 unless ranks are in separate processes)
  // Symmetric (byte offsets).
  size_t peer_ptrs;  // u64 [2][R][kPeerPtrs]: addresses published for a combine (parity = seq & 1)
  size_t x, scales, topk_idx, topk_weights, src_token;  // receive rows; fp8 rows use half of x
  size_t stage_y, stage_weights;                        // combine inputs copied here
};

/// Appends HT's regions (sized from the Config's mode, max_recv_tokens and enable_fp8).
Regions claim_regions(const Config& config, const detail::RegionShape& shape,
                      detail::Arena& symmetric);

}  // namespace moecomm::ht
