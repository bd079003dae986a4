// Low-latency dispatch and combine (expert-major layout, fixed capacity M per source rank).
// One message per (token, selected expert), written straight into its slot of the receiver's
// registered buffer; per-(expert, source) counts are signalled after the data. Two buffers
// alternate between consecutive calls. No host synchronisation: every kernel is graph-capturable.
// Each call has a send phase and a receive phase: with a receive hook they are two kernels (the
// hook launches the second); without one, a single kernel runs both.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "layout/layout.hpp"
#include "paths/device_context.hpp"

namespace moecomm::ll {

struct DispatchRecvParams {
  int buffer = 0;
  int32_t* recv_count = nullptr;   // [L] out
  int32_t* recv_layout = nullptr;  // [L, R, 2] out: (s*M, count)
  bool fp8 = false;                // the dispatch quantised (internode: scales to move from meta)
};

struct DispatchSendParams {
  const uint16_t* x = nullptr;  // [T, H] bf16
  int64_t num_tokens = 0;       // T <= M
  const void* topk_idx = nullptr;
  bool idx_i64 = true;
  bool fp8 = false;  // quantise to e4m3 + f32 scales per 128 channels
  bool pow2_scales = false;
  int buffer = 0;               // 0 or 1
  int32_t* slot_of = nullptr;   // [T, K] out (the handle): d*(L*R*M) + le*(R*M) + s*M + p, or -1
  layout::LayoutParams layout;  // the layout steps it runs first (no count exchange)
  bool receive = false;         // no hook: the last block also runs the receive phase
  DispatchRecvParams recv;      // (when receive)
};

/// Send phase: the layout steps, then every message; with `receive`, the receive phase too.
/// Closes the call; stores the call's seq in ctx.ll.dispatch_seq[buffer] for the receive phase.
void launch_dispatch_send(const detail::DeviceContext& ctx, const DispatchSendParams& params,
                          int blocks, int threads, cudaStream_t stream);

/// Receive phase: waits for every (local expert, source) count of dispatch_seq[buffer].
void launch_dispatch_recv(const detail::DeviceContext& ctx, const DispatchRecvParams& params,
                          cudaStream_t stream);

struct CombineSendParams {
  uint64_t y = 0;  // [L, R*M, H] bf16 of this rank, read by the token owners (published address;
                   // a group spanning nodes puts the rows for other nodes from the RDMA window)
  int buffer = 0;  // the dispatch buffer of the handle
};

/// Send phase of combine: publishes y to every peer (a group spanning nodes: to the peers of this
/// node, and `blocks` x `threads` push the rows the ranks of other nodes need into their windows;
/// one block otherwise). Closes the call; stores its seq in ctx.ll.combine_seq[buffer].
void launch_combine_send(const detail::DeviceContext& ctx, const CombineSendParams& params,
                         int blocks, int threads, cudaStream_t stream);

struct CombineRecvParams {
  int buffer = 0;
  const int32_t* slot_of = nullptr;     // [T, K] from the dispatch handle
  const float* topk_weights = nullptr;  // [T, K]
  int64_t num_tokens = 0;
  uint16_t* out = nullptr;  // [T, H] bf16
  bool publish_y = false;   // no hook: this kernel also runs the send phase (publishes y)
  uint64_t y = 0;           // (when publish_y) as CombineSendParams::y
};

/// Receive phase of combine (with publish_y, the send phase first: one kernel per call):
/// out[t] = bf16(sum_k fmaf(w, y[slot], acc)), then tells every owner its y has been read and
/// waits until every reader is done with this rank's y. With publish_y it closes the call.
void launch_combine_recv(const detail::DeviceContext& ctx, const CombineRecvParams& params,
                         int blocks, int threads, cudaStream_t stream);

/// Loads this file's kernels now. CUDA loads a kernel lazily at its first launch, and that load
/// may wait for the device to go idle, which never happens while co-located ranks spin on each
/// other: so every kernel is loaded when a communicator is built.
void preload_kernels();

}  // namespace moecomm::ll
