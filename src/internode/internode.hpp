// The two-level high-throughput path for a group that spans nodes (DeepEP-style). Ranks of one
// node write rows straight into each other's receive buffers, as the intranode path does; a row
// bound for another node crosses once, as one message put to the rank of the same local index
// there (its forwarder, through transport/rdma.cuh), which copies it to the final rows of the
// ranks of its node. Combine runs the same way back: each forwarder sums its node's expert
// outputs of a message (f32, ascending ranks, rounded to bf16) and puts that partial sum to the
// source, which adds the partials of every node in ascending node order. Outputs, their order and
// the handle's receive summary are the intranode path's.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ht/intranode.hpp"
#include "layout/layout.hpp"
#include "paths/device_context.hpp"

namespace moecomm::internode {

/// What a dispatch records in its handle for combine and for a cached dispatch (device arrays
/// inside the handle's slot, after the intranode part: see handle_ints).
struct HandleArrays {
  int32_t* node_slot = nullptr;      // [Tmax][N]: token t's message index for node b (-1: none)
  int32_t* fwd_rows = nullptr;       // [N][Tmax][G]: rows of each forwarded message at my node
  int32_t* fwd_expected = nullptr;   // [N]: messages this rank forwards from each node
  int32_t* send_per_node = nullptr;  // [N]: tokens of this rank bound for each node
};

/// i32 words of a handle slot that HandleArrays takes (0 when the group is on one node).
inline size_t handle_ints(int max_tokens, int num_ranks, int num_nodes) {
  if (num_nodes <= 1) return 0;
  const size_t T = static_cast<size_t>(max_tokens), N = static_cast<size_t>(num_nodes);
  return T * N + T * static_cast<size_t>(num_ranks) + 2 * N;
}

/// Carves HandleArrays out of `base` (handle_ints words).
inline HandleArrays carve_handle(int32_t* base, int max_tokens, int num_ranks, int num_nodes) {
  HandleArrays h;
  const size_t T = static_cast<size_t>(max_tokens), N = static_cast<size_t>(num_nodes);
  h.node_slot = base;
  h.fwd_rows = h.node_slot + T * N;
  h.fwd_expected = h.fwd_rows + T * static_cast<size_t>(num_ranks);
  h.send_per_node = h.fwd_expected + N;
  return h;
}

/// The intranode path's parameters (the same inputs, the same handle routing) and what the two
/// levels add.
struct DispatchParams : ht::DispatchParams {
  // What the call carries on every rank: forwarders write received scales and weights also where
  // their own rank has no tokens (and its x_scales and topk_weights are null).
  bool has_scales = false;  // fp8 rows out (passthrough or quantised)
  bool has_weights = false;
  HandleArrays handle;       // written by a fresh dispatch, read by a cached one
  bool layout_only = false;  // get_layout: the layout and the count exchange, then the call ends
  // `layout` (unless cached): the layout steps (prefix, no count exchange) and the receive summary
  // (scan options), which this path computes with its own count exchange.
};

/// The dispatch kernel; closes the call. With layout_only (get_layout), it stops after the count
/// exchange (no rows move; `handle` may be empty).
void launch_dispatch(const detail::DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream);

/// The intranode path's parameters and the dispatch handle's internode arrays.
struct CombineParams : ht::CombineParams {
  HandleArrays handle;  // from the dispatch handle
};

/// The combine kernel; closes the call.
void launch_combine(const detail::DeviceContext& ctx, const CombineParams& params, int blocks,
                    int threads, cudaStream_t stream);

/// Loads this path's kernels now (see ht::preload_kernels).
void preload_kernels();

}  // namespace moecomm::internode
