// Device-side "put + signal + wait" over load/store (NVLink, PCIe peer access, or one GPU's own
// memory for co-located virtual ranks). Data is put with ordinary stores into a peer's symmetric
// buffer; a signal is a release store of the call's sequence number into the peer's flag slot;
// a wait is a bounded acquire loop that turns a stall into a recorded error.
#pragma once

#include <cstdint>

#include "device/memory_model.cuh"
#include "runtime/device_context.hpp"

namespace moecomm::transport {

using detail::DeviceErrorKind;
using detail::FlagKind;
using detail::Phase;
using detail::RankContext;

/// Address of a region `offset` bytes into rank `owner`'s symmetric buffer.
template <typename T>
__device__ __forceinline__ T* peer_region(const RankContext& ctx, int owner, size_t offset) {
  return reinterpret_cast<T*>(ctx.peers[owner] + offset);
}

/// Flag slot that `src` writes in `owner`'s buffer.
__device__ __forceinline__ uint64_t* flag_slot(const RankContext& ctx, int owner, FlagKind kind,
                                               int src) {
  return peer_region<uint64_t>(ctx, owner, ctx.sym.flags) +
         static_cast<int>(kind) * detail::kMaxRanks + src;
}

/// The address a peer published (see detail::kSymmetricOffsetTag), as this rank sees it.
__device__ __forceinline__ const void* resolve_address(const RankContext& ctx, int owner,
                                                       uint64_t published) {
  if (published & detail::kSymmetricOffsetTag)
    return ctx.peers[owner] + (published & ~detail::kSymmetricOffsetTag);
  return reinterpret_cast<const void*>(published);
}

/// Records the first error of this rank (later ones are dropped). A stall also marks the rank
/// aborted so that its other waits give up at once; bad input does not (the call completes, with
/// the bad entries treated as -1, and the host raises).
__device__ inline void record_error(const RankContext& ctx, DeviceErrorKind kind, int peer,
                                    Phase phase, int channel, uint64_t seq, int64_t observed,
                                    int64_t a = 0, int64_t b = 0) {
  detail::DeviceError* e = ctx.error;
  if (atomicCAS(reinterpret_cast<int*>(&e->kind), 0, -1) == 0) {
    e->rank = ctx.rank;
    e->peer = peer;
    e->phase = static_cast<int32_t>(phase);
    e->channel = channel;
    e->seq = static_cast<int64_t>(seq);
    e->observed = observed;
    e->a = a;
    e->b = b;
    __threadfence_system();
    atomicExch(reinterpret_cast<int*>(&e->kind), static_cast<int>(kind));
  }
  if (kind == DeviceErrorKind::kStall) atomicExch(ctx.local.aborted, 1);
}

/// True once any wait of this rank has failed: later waits give up immediately.
__device__ __forceinline__ bool aborted(const RankContext& ctx) {
  return *reinterpret_cast<volatile int*>(ctx.local.aborted) != 0;
}

/// Memory-ordering scope for this group's signals and fences.
__device__ __forceinline__ device::Scope scope(const RankContext& ctx) {
  return device::Scope{ctx.one_gpu != 0};
}

/// Signals `dst` that this rank reached `seq` of `kind`. Call after a release fence that covers
/// the data the signal publishes (fence_acq_rel_sys, or a CTA barrier then that fence).
__device__ __forceinline__ void signal(const RankContext& ctx, int dst, FlagKind kind,
                                       uint64_t seq) {
  scope(ctx).store_release(flag_slot(ctx, dst, kind, ctx.rank), seq);
}

/// Waits until `word` >= `target` (acquire). Gives up after ctx.timeout_ns times `patience`,
/// recording a stall that names this rank, `peer`, `phase` and `channel`. Returns false on
/// failure, and at once once another wait of this rank has failed.
__device__ inline bool wait_geq(const RankContext& ctx, const uint64_t* word, uint64_t target,
                                int peer, Phase phase, int channel, uint32_t patience = 1) {
  const device::Scope sc = scope(ctx);
  uint64_t v = sc.load_acquire(word);
  if (v >= target) return true;
  if (aborted(ctx)) return false;
  const uint64_t start = device::global_timer_ns();
  for (uint32_t spin = 0;; ++spin) {
    v = sc.load_acquire(word);
    if (v >= target) return true;
    if ((spin & 255u) == 255u) {
      if (aborted(ctx)) return false;
      if (device::global_timer_ns() - start > ctx.timeout_ns * patience) {
        record_error(ctx, DeviceErrorKind::kStall, peer, phase, channel, target,
                     static_cast<int64_t>(v));
        return false;
      }
    }
  }
}

/// Waits for `src`'s signal of `kind` to reach `seq`.
__device__ __forceinline__ bool wait_signal(const RankContext& ctx, FlagKind kind, int src,
                                            uint64_t seq, Phase phase, int channel) {
  return wait_geq(ctx, flag_slot(ctx, ctx.rank, kind, src), seq, src, phase, channel);
}

/// Every thread of a block: signals `kind` at `seq` to every peer, then waits until every peer
/// has signalled the same to this rank. The loops run over peers, so a block may have fewer
/// threads than the group has ranks. Each thread fences before its signals, so that the block's
/// earlier writes (ordered before the call by a CTA barrier) are published with them. True in
/// every thread when every wait succeeded.
__device__ inline bool signal_and_wait_all(const RankContext& ctx, FlagKind kind, uint64_t seq,
                                           Phase phase, int channel) {
  const int R = ctx.num_ranks;
  if (threadIdx.x < R) scope(ctx).fence();
  for (int d = threadIdx.x; d < R; d += blockDim.x) signal(ctx, d, kind, seq);
  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    ok = wait_signal(ctx, kind, d, seq, phase, channel) && ok;
  return __syncthreads_and(ok) != 0;
}

}  // namespace moecomm::transport
