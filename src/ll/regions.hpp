// The memory the low-latency path needs: in every rank's symmetric buffer, two alternating
// buffers of expert-major slots ([L][R*M] each) with their count signals and the addresses a
// combine publishes; per rank, the sequence numbers the receive hooks wait for and the receive
// counts and layout returned to the caller.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"

namespace moecomm::ll {

struct Regions {
  int32_t capacity;  // M, tokens per source rank (0 when the communicator does not serve LL)
  // Symmetric (byte offsets); [2] = the two buffers.
  size_t count_sig;  // u64 [2][L][R]: (seq << 32) | count
  size_t peer_ptrs;  // u64 [2][R][kPeerPtrs]: addresses published for a combine (per buffer)
  size_t x[2], scales[2], src_token[2], combine[2];
  // Private.
  uint64_t* dispatch_seq;  // [2] seq of the dispatch send that filled each buffer (for the hook)
  uint64_t* combine_seq;   // [2] seq of the combine send phase (for its hook)
  int32_t* recv_count;     // [2][L]
  int32_t* recv_layout;    // [2][L][R][2]
};

/// Appends LL's regions (sized from the Config's mode, LL capacity and enable_fp8).
Regions claim_regions(const Config& config, const detail::RegionShape& shape,
                      detail::Arena& symmetric, detail::Arena& local);

}  // namespace moecomm::ll
