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

struct DispatchParams {
  const void* x = nullptr;  // [T, H] bf16, or fp8 bytes
  int64_t num_tokens = 0;
  int in_row_bytes = 0;             // bytes of one x row
  int out_row_bytes = 0;            // bytes of one received row
  const float* x_scales = nullptr;  // fp8 passthrough: [T, H/128]
  bool quantize = false;            // bf16 in, fp8 + scales out
  bool pow2_scales = false;
  const void* topk_idx = nullptr;
  bool idx_i64 = true;
  const float* topk_weights = nullptr;  // [T, K] or null
  // What the call carries on every rank: forwarders write received scales and weights also where
  // their own rank has no tokens (and its x_scales and topk_weights are null).
  bool has_scales = false;  // fp8 rows out (passthrough or quantised)
  bool has_weights = false;
  int32_t* send_row =
      nullptr;               // [T, R]: row at each destination rank (-1: none). Read when cached.
  HandleArrays handle;       // written by a fresh dispatch, read by a cached one
  bool cached = false;       // routing from the handle; no layout in this call
  bool layout_only = false;  // get_layout: the layout and the count exchange, then the call ends
  layout::LayoutParams layout;  // unless cached: the layout steps (prefix, no count exchange) and
                                // the receive summary (scan options), which this path computes
};

/// The dispatch kernel; closes the call. With layout_only (get_layout), it stops after the count
/// exchange (no rows move; `handle` may be empty).
void launch_dispatch(const detail::DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream);

struct CombineParams {
  uint64_t y = 0;                  // [N, H] bf16 of this rank, read by its node's ranks (published)
  uint64_t recv_weights = 0;       // [N, K] f32 of this rank, or 0 (published)
  const uint16_t* bias = nullptr;  // [T, H] or null
  uint16_t* out = nullptr;         // [T, H]
  float* combined_weights = nullptr;  // [T, K] or null (needs recv_weights on every rank)
  const int32_t* send_row = nullptr;  // [T, R] from the dispatch handle
  HandleArrays handle;                // from the dispatch handle
  int64_t num_tokens = 0;
};

/// The combine kernel; closes the call.
void launch_combine(const detail::DeviceContext& ctx, const CombineParams& params, int blocks,
                    int threads, cudaStream_t stream);

/// Loads this path's kernels now (see ht::preload_kernels).
void preload_kernels();

}  // namespace moecomm::internode
