// Meeting points of blocks and ranks: the election of a rank's last block (which publishes
// completion and closes the call), the grid barrier between a kernel's steps, and the arrival
// handshake that tells peers a rank has entered a call. All of them wait, bounded, through
// transport/signal.cuh.
#pragma once

#include <cstdint>

#include "device/block.cuh"
#include "device/memory_model.cuh"
#include "runtime/device_context.hpp"
#include "transport/signal.cuh"

namespace moecomm::transport {

using device::RankBlocks;
using device::Scope;
using device::whole_grid;

/// Every thread calls this after its block's work. Returns true in every thread of the last
/// block to arrive; by then all other blocks' writes are visible (fence before the ticket).
__device__ __forceinline__ bool is_last_block(const detail::RankContext& ctx,
                                              RankBlocks blocks = whole_grid()) {
  __shared__ bool last;
  __syncthreads();
  const Scope sc = scope(ctx);
  if (threadIdx.x == 0) {
    sc.fence();
    const uint32_t ticket = atomicAdd(ctx.local.ticket, 1u);
    last = ticket == static_cast<uint32_t>(blocks.count - 1);
    if (last) {
      *ctx.local.ticket = 0;  // every other block has taken its ticket: ready for the next kernel
      sc.fence();
    }
  }
  __syncthreads();
  return last;
}

inline constexpr uint32_t kGridBarrierPatience = 2;

/// Every thread of every block: returns when all blocks of the grid have arrived (they must be
/// co-resident, as every communication kernel's are). A sense-reversing barrier: the last block to
/// arrive resets the count and advances the generation the others wait on, so kernels of any
/// grid size may use it one after another. Every block must reach every barrier, also after a
/// failed wait (pass ok = false); the result is ok and the barrier's own wait succeeding.
__device__ __forceinline__ bool grid_barrier(const detail::RankContext& ctx, bool ok,
                                             RankBlocks blocks) {
  __shared__ bool all_ok;
  uint64_t* count = ctx.local.grid_barrier;
  uint64_t* generation = ctx.local.grid_barrier + 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    const Scope sc{true};  // the blocks of one kernel share its GPU
    const uint64_t gen = sc.load_acquire(generation);
    sc.fence();  // this block's writes before its arrival
    all_ok = true;
    if (atomicAdd(reinterpret_cast<unsigned long long*>(count), 1ull) ==
        static_cast<uint64_t>(blocks.count - 1)) {
      sc.fence();  // the other blocks' writes (seen through the count) before this block goes on
      *count = 0;  // every block has arrived: nobody touches the count until the next barrier
      sc.store_release(generation, gen + 1);
    } else {
      // A sibling block may itself be waiting (up to one timeout) for a peer before it arrives:
      // twice the patience, so that the stall is reported by the wait that saw it first.
      all_ok = wait_geq(ctx, generation, gen + 1, ctx.rank, detail::Phase::kGridBarrier,
                        blocks.index, kGridBarrierPatience);
    }
  }
  __syncthreads();
  return all_ok && ok;
}

/// Block 0 of the rank: tells every peer that this rank entered call seq (its buffers of call
/// seq - 2 are free for the peers to write).
__device__ __forceinline__ void announce_arrival(const detail::RankContext& ctx, uint64_t seq,
                                                 RankBlocks blocks) {
  if (blocks.index == 0) {
    const uint64_t masked = masked_peers(ctx);
    for (int d = threadIdx.x; d < ctx.num_ranks; d += blockDim.x)
      if (!((masked >> d) & 1ull)) signal(ctx, d, detail::FlagKind::kArrive, seq);
  }
}

/// Every block: waits until every peer has entered call seq. True in every thread when all
/// waits succeeded.
__device__ __forceinline__ bool await_arrivals(const detail::RankContext& ctx, uint64_t seq,
                                               RankBlocks blocks) {
  bool ok = true;
  for (int d = threadIdx.x; d < ctx.num_ranks; d += blockDim.x)
    ok =
        wait_signal(ctx, detail::FlagKind::kArrive, d, seq, detail::Phase::kArrive, blocks.index) &&
        ok;
  return __syncthreads_and(ok) != 0;
}

}  // namespace moecomm::transport
