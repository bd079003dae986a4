// Device steps the internode dispatch and combine kernels share: where things lie in the RDMA
// window, the handshakes restricted to one node (loads and stores) or to the same-index ranks of
// the other nodes (through the RDMA engine), and the layout of a dispatch message.
#pragma once

#include <cstdint>

#include "device/block.cuh"
#include "internode/internode.hpp"
#include "transport/barrier.cuh"
#include "transport/rdma.cuh"
#include "transport/signal.cuh"

namespace moecomm::internode {

using detail::DeviceContext;
using detail::FlagKind;
using detail::Phase;
using detail::TraceMark;
using device::kFullMask;
using device::pop_lowest;
namespace rdma = transport::rdma;

/// This rank's window at byte offset `offset`.
template <typename T>
__device__ __forceinline__ T* window_at(const DeviceContext& ctx, uint64_t offset) {
  return transport::peer_region<T>(ctx, ctx.rank, offset);
}

/// The rank of node `b` with this rank's local index: this rank's partner (forwarder) there.
__device__ __forceinline__ int partner_on(const DeviceContext& ctx, int b) {
  return b * ctx.node_size + ctx.rank % ctx.node_size;
}

/// Window offset of message j of node b in a [N][Tmax] array of `bytes`-sized entries at `base`.
__device__ __forceinline__ uint64_t entry_offset(const DeviceContext& ctx, uint64_t base, int b,
                                                 int64_t j, int64_t bytes) {
  return base + (static_cast<uint64_t>(b) * ctx.max_tokens + j) * bytes;
}

/// Signal word of (node b, chunk c) in a [N][chunks] array at `base`.
__device__ __forceinline__ uint64_t chunk_signal(const DeviceContext& ctx, uint64_t base, int b,
                                                 int c) {
  return base + (static_cast<uint64_t>(b) * ctx.internode.chunks + c) * sizeof(uint64_t);
}

/// Entries of chunk c when `total` entries are sent (0 past the last chunk).
__device__ __forceinline__ int chunk_entries(int total, int c) {
  const int n = total - c * kChunkTokens;
  return n < 0 ? 0 : (n < kChunkTokens ? n : kChunkTokens);
}

/// The metadata of a dispatch message, after its row (and scales) at msg_meta: K i32 global
/// expert ids (-1: none), K f32 weights, the source token, then the row at each rank of the
/// destination node (-1: none).
struct MessageMeta {
  int32_t* experts;
  float* weights;
  int32_t* src_token;
  int32_t* rows;

  __device__ MessageMeta(const DeviceContext& ctx, uint8_t* message) {
    const int K = ctx.topk;
    experts = reinterpret_cast<int32_t*>(message + ctx.internode.msg_meta);
    weights = reinterpret_cast<float*>(experts + K);
    src_token = reinterpret_cast<int32_t*>(weights + K);
    rows = src_token + 1;
  }
};

/// Every thread of a block: signals `kind` at `seq` to every rank of this node (loads and stores)
/// and waits for theirs. True in every thread when every wait succeeded.
__device__ inline bool node_signal_and_wait(const DeviceContext& ctx, FlagKind kind, uint64_t seq,
                                            Phase phase, int channel) {
  const int G = ctx.node_size, first = ctx.node * G;
  if (threadIdx.x < G) transport::scope(ctx).fence();
  for (int g = threadIdx.x; g < G; g += blockDim.x) transport::signal(ctx, first + g, kind, seq);
  bool ok = true;
  for (int g = threadIdx.x; g < G; g += blockDim.x)
    ok = transport::wait_signal(ctx, kind, first + g, seq, phase, channel) && ok;
  return __syncthreads_and(ok) != 0;
}

/// One warp (every lane): adds one to sig_arrive[me] at this rank's partner on every other node:
/// "my window is free for this call".
__device__ inline void announce_remote_arrival(const DeviceContext& ctx) {
  rdma::WarpPort port(ctx);
  for (int b = 0; b < ctx.num_nodes; ++b)
    if (b != ctx.node)
      port.signal(partner_on(ctx, b), ctx.internode.sig_arrive + ctx.rank * sizeof(uint64_t), 1);
}

/// Every thread of one block: waits for the arrival of this rank's partner on every other node
/// and consumes it. True in every thread when every wait succeeded.
__device__ inline bool await_remote_arrivals(const DeviceContext& ctx, int channel) {
  bool ok = true;
  for (int b = threadIdx.x; b < ctx.num_nodes; b += blockDim.x) {
    if (b == ctx.node) continue;
    const int peer = partner_on(ctx, b);
    const uint64_t sig = ctx.internode.sig_arrive + peer * sizeof(uint64_t);
    if (rdma::wait_signal(ctx, sig, 1, peer, Phase::kRdmaArrive, channel))
      rdma::consume_signal(ctx, sig, 1);
    else
      ok = false;
  }
  return __syncthreads_and(ok) != 0;
}

/// One warp: waits until the chunk signal `sig` reaches `count`, without consuming it (several
/// warps may wait for one chunk), delivering the warp's held signals meanwhile. False after a
/// failed wait.
__device__ inline bool chunk_arrived(const DeviceContext& ctx, rdma::WarpPort& port, uint64_t sig,
                                     int count, int peer, int channel) {
  return rdma::wait_signal_delivering(ctx, port, sig, static_cast<uint64_t>(count), peer,
                                      Phase::kRdmaData, channel);
}

/// Global warp index and warp count of the grid.
__device__ __forceinline__ int64_t global_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
}
__device__ __forceinline__ int64_t grid_warps() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
}

}  // namespace moecomm::internode
