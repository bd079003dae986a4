// One warp's ring of shared-memory slots filled by bulk (TMA) loads. A single instruction moves a
// whole piece of a row without registers, so a warp keeps every slot's bytes in flight while it
// reads the oldest: more bytes in flight per SM than register loads allow, where few SMs have to
// keep the memory busy.
#pragma once

#include <cstdint>

#include "device/block.cuh"
#include "device/memory_model.cuh"

namespace moecomm::device {

template <int SlotBytes = 1024>
struct BulkLoadRing {
  static constexpr int kSlotBytes = SlotBytes;  // a piece of a row: 16-byte vectors, 32 lanes
  static constexpr int kSlotFootprint = kSlotBytes + static_cast<int>(sizeof(uint64_t));

  uint8_t* data;       // slots x kSlotBytes, 16-byte aligned
  uint64_t* barriers;  // one per slot
  int slots;           // 1 .. 32, the same in every lane
  int head = 0;        // the slot the next load fills
  int tail = 0;        // the slot read next (loads are read in the order they were issued)
  int in_flight = 0;
  uint32_t parity = 0;  // bit s: the parity of slot s's next completion

  /// Shared memory that `warps` warps with `slots` slots each need.
  static constexpr size_t smem_bytes(int warps, int slots) {
    return static_cast<size_t>(warps) * slots * kSlotFootprint;
  }

  /// Warp `warp`'s ring in a block's shared memory `smem` (laid out for `warps` warps). Every
  /// lane calls it; lane 0 initialises the barriers.
  __device__ __forceinline__ static BulkLoadRing in(uint8_t* smem, int warp, int warps, int slots,
                                                    int lane) {
    BulkLoadRing r{
        smem + static_cast<size_t>(warp) * slots * kSlotBytes,
        reinterpret_cast<uint64_t*>(smem + static_cast<size_t>(warps) * slots * kSlotBytes) +
            warp * slots,
        slots};
    if (lane == 0) {
      for (int s = 0; s < slots; ++s) mbarrier_init(r.barriers + s, 1);
      fence_barrier_init();
    }
    __syncwarp();
    return r;
  }

  __device__ __forceinline__ bool full() const { return in_flight == slots; }

  /// Loads `bytes` (a multiple of 16, at most kSlotBytes) from 16-byte aligned `src` into the
  /// next slot. Every lane calls it (lane 0 issues); the ring must not be full.
  __device__ __forceinline__ void issue(const void* src, int bytes, int lane) {
    if (lane == 0) bulk_load(data + head * kSlotBytes, src, bytes, barriers + head);
    head = head + 1 == slots ? 0 : head + 1;
    ++in_flight;
  }

  /// Waits until the oldest load has landed and returns its slot; false in every lane when it
  /// had not after `timeout_ns`. Every lane calls it.
  __device__ __forceinline__ bool wait_oldest(const uint8_t*& slot, uint64_t timeout_ns) const {
    const uint32_t phase = (parity >> tail) & 1u;
    bool done = mbarrier_try_wait(barriers + tail, phase);
    if (!__all_sync(kFullMask, done)) {
      const uint64_t start = global_timer_ns_warp();
      while (!__all_sync(kFullMask, done)) {
        const bool expired = global_timer_ns_warp() - start > timeout_ns;
        done = done || mbarrier_try_wait(barriers + tail, phase);
        // Past the deadline the try above was the last look (a warp descheduled before reading
        // the timer must not report a load that landed meanwhile as a stall).
        if (expired && !__all_sync(kFullMask, done)) return false;
      }
    }
    slot = data + tail * kSlotBytes;
    return true;
  }

  /// The oldest slot has been read by every lane: it may take the next load.
  __device__ __forceinline__ void release_oldest() {
    __syncwarp();
    parity ^= 1u << tail;
    tail = tail + 1 == slots ? 0 : tail + 1;
    --in_flight;
  }
};

}  // namespace moecomm::device
