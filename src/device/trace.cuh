// Phase timestamps of a rank's calls (runtime/device_context.hpp: TraceMark). Thread 0 of each
// block marks a phase with an atomic max of the global timer, so a mark is when the last block
// passed it (the first start is kept inverted, so that a max gives the earliest). A call writes
// the slot of its sequence number's parity; closing it clears the other slot for the next call.
// Each mark costs a block one fire-and-forget atomic.
#pragma once

#include <cstdint>

#include "device/memory_model.cuh"
#include "runtime/device_context.hpp"

namespace moecomm::device {

using detail::kTraceMarks;
using detail::TraceMark;

__device__ __forceinline__ uint64_t* trace_slot(const detail::RankContext& ctx, uint64_t seq) {
  return ctx.local.trace + (seq & 1) * kTraceMarks;
}

/// Thread 0 of every block: when this block passed phase `mark` of call seq.
__device__ __forceinline__ void trace_mark(const detail::RankContext& ctx, uint64_t seq,
                                           TraceMark mark) {
  if (threadIdx.x != 0) return;
  atomicMax(reinterpret_cast<unsigned long long*>(trace_slot(ctx, seq) + static_cast<int>(mark)),
            static_cast<unsigned long long>(global_timer_ns()));
}

/// Every thread of the block: `mark` once all of the block's warps have passed it (a mark whose
/// warps finish apart, e.g. the end of a loop over tokens).
__device__ __forceinline__ void trace_block_mark(const detail::RankContext& ctx, uint64_t seq,
                                                 TraceMark mark) {
  __syncthreads();
  trace_mark(ctx, seq, mark);
}

/// Thread 0 of every block of the call's first kernel, first thing: its start.
__device__ __forceinline__ void trace_start(const detail::RankContext& ctx, uint64_t seq) {
  if (threadIdx.x != 0) return;
  const uint64_t now = global_timer_ns();
  auto* slot = reinterpret_cast<unsigned long long*>(trace_slot(ctx, seq));
  atomicMax(slot + static_cast<int>(TraceMark::kFirstStart), ~static_cast<unsigned long long>(now));
  atomicMax(slot + static_cast<int>(TraceMark::kLastStart), static_cast<unsigned long long>(now));
}

/// By the thread that closes call seq (close_call): the next call's slot starts empty.
__device__ __forceinline__ void trace_clear_next(const detail::RankContext& ctx, uint64_t seq) {
  uint64_t* next = trace_slot(ctx, seq + 1);
#pragma unroll
  for (int i = 0; i < kTraceMarks; ++i) next[i] = 0;
}

}  // namespace moecomm::device
