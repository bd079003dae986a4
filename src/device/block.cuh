// Block- and warp-level building blocks shared by the kernels: which blocks serve a rank, the
// call's sequence number, warp masks and index loads. Nothing here waits on a peer (waits,
// barriers and handshakes live in transport/).
#pragma once

#include <cstdint>

#include "device/trace.cuh"
#include "runtime/device_context.hpp"

namespace moecomm::device {

inline constexpr unsigned kFullMask = 0xffffffffu;  // every lane of a warp
inline constexpr int kWarpLanes = 32;

/// The blocks that serve one rank in a kernel: the whole grid of a rank's own kernel, or one
/// rank's slice of a group kernel (which serves every rank of a one-GPU group in one launch).
struct RankBlocks {
  int index;  // this block among them
  int count;
};

/// A rank's own kernel: every block of the grid serves it.
__device__ __forceinline__ RankBlocks whole_grid() {
  return {static_cast<int>(blockIdx.x), static_cast<int>(gridDim.x)};
}

/// Sequence number of the running call, read once per block at kernel start (into shared
/// memory), by every kernel that starts a call's work; the block's start is traced. The call's
/// last kernel advances the epoch (close_call) after every block read it.
__device__ __forceinline__ uint64_t read_call_seq(const detail::RankContext& ctx) {
  __shared__ uint64_t seq;
  if (threadIdx.x == 0) seq = *reinterpret_cast<volatile uint64_t*>(ctx.local.epoch) + 1;
  __syncthreads();
  trace_start(ctx, seq);
  return seq;
}

/// Run by one thread of the last block of the call's last kernel: the next call gets seq + 1
/// (and an empty trace slot).
__device__ __forceinline__ void close_call(const detail::RankContext& ctx) {
  const uint64_t seq = *ctx.local.epoch + 1;
  trace_clear_next(ctx, seq);
  *ctx.local.epoch = seq;
}

/// Work units (tokens) handed to the warps of a rank's kernel one at a time, from a counter in
/// the rank's private memory: the warps that drew cheap units take more, so the kernel ends with
/// its last unit rather than with its busiest warp. A warp draws its next unit before working on
/// the current one (the atomic's latency hides behind the work), and the kernel's last block
/// resets the counter for the next kernel.
struct WorkQueue {
  uint32_t* counter;

  /// Lane 0's draw; read it with unit() once the current unit is done.
  __device__ __forceinline__ uint32_t draw(int lane) const {
    return lane == 0 ? atomicAdd(counter, 1u) : 0u;
  }
  __device__ __forceinline__ static int64_t unit(uint32_t drawn) {
    return __shfl_sync(kFullMask, drawn, 0);
  }
  /// By one thread of the kernel's last block, after every block has stopped drawing.
  __device__ __forceinline__ void reset() const { *counter = 0; }
};

/// The lowest set bit's index (m must not be 0), cleared from m: walks a rank mask in ascending
/// rank order.
__device__ __forceinline__ int pop_lowest(uint64_t& m) {
  const int d = __ffsll(static_cast<long long>(m)) - 1;
  m &= m - 1;
  return d;
}

/// Element i of a topk_idx array that is int64 or int32 (widened).
__device__ __forceinline__ int64_t load_index(const void* data, bool is_i64, int64_t i) {
  return is_i64 ? static_cast<const int64_t*>(data)[i]
                : static_cast<int64_t>(static_cast<const int32_t*>(data)[i]);
}

}  // namespace moecomm::device
