// High-throughput dispatch and combine for ranks that share a load/store domain (NVLink, PCIe
// peer access, or virtual ranks of one GPU). Senders write every row straight to its final place
// in the receiver's registered buffer (zero-copy); combine pulls the experts' outputs from their
// owners and reduces them in f32 in ascending rank order (deterministic).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "layout/layout.hpp"
#include "paths/device_context.hpp"

namespace moecomm::ht {

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
  int32_t* send_row = nullptr;  // [T, R]: row at each destination (-1: none). Read when cached.
  bool cached = false;          // routing from send_row; no layout in this call
  layout::LayoutParams layout;  // unless cached: the layout steps (with the count exchange)
};

/// The dispatch kernel; closes the call. Unless cached, it first runs the layout steps with all
/// its blocks (the count exchange tells every sender where its rows go), then copies the rows.
void launch_dispatch(const detail::DeviceContext& ctx, const DispatchParams& params, int blocks,
                     int threads, cudaStream_t stream);

struct CombineParams {
  uint64_t y = 0;             // [N, H] bf16 of this rank, read by its peers (published address)
  uint64_t recv_weights = 0;  // [N, K] f32 of this rank, or 0 (published address)
  const uint16_t* bias = nullptr;     // [T, H] or null
  uint16_t* out = nullptr;            // [T, H]
  float* combined_weights = nullptr;  // [T, K] or null (needs recv_weights on every rank)
  const int32_t* send_row = nullptr;  // [T, R] from the dispatch handle
  int64_t num_tokens = 0;
  /// Slots of each warp's ring of bulk loads (0: the peers' rows are read through registers).
  /// Set by launch_combine.
  int bulk_load_slots = 0;
};

/// Combine kernel; closes the call.
void launch_combine(const detail::DeviceContext& ctx, const CombineParams& params, int blocks,
                    int threads, cudaStream_t stream);

/// Loads this file's kernels now. CUDA loads a kernel lazily at its first launch, and that load
/// may wait for the device to go idle, which never happens while co-located ranks spin on each
/// other: so every kernel is loaded when a communicator is built.
void preload_kernels();

}  // namespace moecomm::ht
