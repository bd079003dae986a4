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

/// The peers this rank leaves out of its calls (bit d: rank d), read live: a wait that masked
/// an unresponsive peer sets its bit for every later wait. A rank whose own bit is set is out of
/// the group: it treats every other rank as masked, so its calls complete alone (and stay in step
/// with the group's calls, so that clearing the masks lets it rejoin).
__device__ __forceinline__ uint64_t masked_peers(const RankContext& ctx) {
  const uint64_t word = *reinterpret_cast<volatile uint64_t*>(ctx.local.rank_mask);
  const uint64_t me = 1ull << ctx.rank;
  return (word & me) ? ~me : word & ~me;
}

__device__ __forceinline__ bool is_masked(const RankContext& ctx, int peer) {
  return (masked_peers(ctx) >> peer) & 1ull;
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

/// Masks `peer` for this rank's calls from now on and tells the host (masked_by_timeout).
__device__ inline void mask_peer(const RankContext& ctx, int peer) {
  atomicOr(reinterpret_cast<unsigned long long*>(ctx.local.rank_mask), 1ull << peer);
  reinterpret_cast<volatile int32_t*>(ctx.masked_by_timeout)[peer] = 1;
  __threadfence_system();
}

/// Waits until `word` >= `target` (acquire). Returns true when it got there, and also when
/// `peer` is masked (callers that read the peer's data check is_masked afterwards). Gives up
/// after ctx.timeout_ns times `patience`: with ctx.mask_on_timeout the peer is then masked
/// (true); otherwise a stall naming this rank, `peer`, `phase` and `channel` is recorded
/// (false). Returns false at once once another wait of this rank has failed.
__device__ inline bool wait_geq(const RankContext& ctx, const uint64_t* word, uint64_t target,
                                int peer, Phase phase, int channel, uint32_t patience = 1) {
  const device::Scope sc = scope(ctx);
  const bool other = peer >= 0 && peer != ctx.rank;
  uint64_t v = sc.load_acquire(word);
  if (v >= target) return true;
  if (other && is_masked(ctx, peer)) return true;
  if (aborted(ctx)) return false;
  const uint64_t start = device::global_timer_ns();
  for (uint32_t spin = 0;; ++spin) {
    v = sc.load_acquire(word);
    if (v >= target) return true;
    if ((spin & 255u) == 255u) {
      if (aborted(ctx)) return false;
      if (other && is_masked(ctx, peer)) return true;
      if (device::global_timer_ns() - start > ctx.timeout_ns * patience) {
        // One last look: a thread descheduled between its last load and the timer's read (a
        // time-sliced process) must not report a value that arrived meanwhile as a stall.
        v = sc.load_acquire(word);
        if (v >= target) return true;
        if (other && ctx.mask_on_timeout) {
          mask_peer(ctx, peer);
          return true;
        }
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
  const uint64_t masked = masked_peers(ctx);  // masked peers are neither signalled nor awaited
  if (threadIdx.x < R) scope(ctx).fence();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (!((masked >> d) & 1ull)) signal(ctx, d, kind, seq);
  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    ok = wait_signal(ctx, kind, d, seq, phase, channel) && ok;
  return __syncthreads_and(ok) != 0;
}

}  // namespace moecomm::transport
