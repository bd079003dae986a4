// The memory the low-latency path needs: in every rank's symmetric buffer, two alternating
// buffers of expert-major slots ([L][R*M] each) with their count signals and the addresses a
// combine publishes; per rank, the sequence numbers the receive hooks wait for and the receive
// counts and layout returned to the caller. A group that spans nodes adds, in the RDMA window,
// what ranks of other nodes reach only through the RDMA engine (transport/rdma.cuh): the rows this
// rank stages for its puts, the slot metadata and combine rows it receives, and signal counters.
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
  // Internode (claimed only when the group spans nodes; window offsets). The engine puts whole
  // 16-byte vectors, so the 4-byte src_token and scale of a slot come through meta instead.
  int32_t meta_words;      // u64 per slot in meta: src_token, then one scale per 128 channels (fp8)
  size_t stage;            // [M] rows of 2H bytes: this rank's rows (bf16, or fp8 then f32 scales)
  size_t meta[2];          // u64 [L][R*M][meta_words]: from remote sources, per slot
  size_t combine_recv[2];  // bf16 [R-G][L][M][H]: expert rows pushed by the ranks of other nodes
  size_t sig_arrive;       // u64 [R]: remote rank entered a dispatch (counter)
  size_t sig_counts;       // u64 [2][R]: remote source's counts (and rows) of buffer b landed
  size_t sig_combine;      // u64 [2][R]: remote expert rank's combine rows of buffer b landed
  size_t sig_done;         // u64 [2][R]: remote rank finished its combine of buffer b
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
