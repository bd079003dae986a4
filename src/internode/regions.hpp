// The memory of the two-level (internode) high-throughput path. In the RDMA window of every rank:
// the count messages, the dispatch messages a rank sends to each node and receives from each
// node (as the forwarder of its local index), the combine partial sums it sends and receives, and
// the signal words. Per rank: the node bitmaps of the layout. Claimed only when the group spans
// nodes and serves HT.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"

namespace moecomm::internode {

/// Tokens whose messages one signal covers (per source node and chunk).
inline constexpr int kChunkTokens = 64;

struct Regions {
  int32_t num_nodes;    // N (0 when the path is not in use)
  int32_t node_size;    // G
  int32_t chunks;       // ceil(Tmax / kChunkTokens)
  int32_t count_words;  // i32 per count message: R + N + L (padded to 4)
  int64_t msg_bytes;    // one dispatch message: row, scales, metadata (16-byte multiple)
  int64_t msg_meta;     // offset of the metadata in a message
  int64_t part_bytes;   // one combine partial sum: bf16 row then K f32 weights (16-byte multiple)
  // Window (byte offsets from the window's start).
  size_t count_stage;    // i32 [R][count_words]: this rank's message to each rank
  size_t count_recv;     // i32 [2][R][count_words]: each rank's message to this one (parity:
                         // fresh dispatches so far, not the call's seq)
  size_t dispatch_send;  // [N][Tmax] messages staged for each node
  size_t dispatch_recv;  // [N][Tmax] messages from the same-index rank of each node
  size_t combine_send;   // [N][Tmax] partial sums staged for each node
  size_t combine_recv;   // [N][Tmax] partial sums from each node
  size_t sig_counts;     // u64 [R]: count messages received
  size_t sig_arrive;     // u64 [R]: remote ranks that entered a call
  size_t sig_dispatch;   // u64 [N][chunks]: dispatch messages received per chunk
  size_t sig_combine;    // u64 [N][chunks]: partial sums received per chunk
  // Private.
  uint32_t* node_bitmap;         // [N][W]: token t goes to node n
  int32_t* node_word_prefix;     // [N][W]
  int32_t* num_tokens_per_node;  // [N]
  uint64_t* fresh_dispatches;    // [1]: fresh dispatches so far (count_recv's parity)
};

/// Appends the path's regions (window ones to `window`) when the group spans nodes and serves HT.
Regions claim_regions(const Config& config, const detail::RegionShape& shape, detail::Arena& window,
                      detail::Arena& local);

}  // namespace moecomm::internode
