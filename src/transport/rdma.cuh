// The RDMA engine seam: how a rank reaches ranks on other nodes. Ranks of one node keep loads and
// stores (transport/signal.cuh); ranks on different nodes talk only through these calls, which
// touch nothing but the peers' RDMA windows (the first Config::rdma_bytes of each symmetric
// buffer). The calls mirror what an RDMA NIC driven from the GPU offers (NCCL's GIN, IBGDA):
//
//   put         copy bytes from this rank's window to a peer's window; returns at once.
//   signal      add to a u64 signal word in a peer's window, after this warp's earlier puts to
//               that peer have landed (put_signal: both).
//   signal_later the same, but the warp goes on at once: the signal is delivered when the
//               modelled NIC is done with the data, at the latest at the warp's next flush.
//               A warp must flush before it waits on a peer (the peer may be waiting for it).
//   flush       every put of this warp has landed at its destination.
//   wait_signal bounded wait until one of this rank's signal words reaches a value.
//   consume     take a value back off this rank's own signal word once it has been waited for.
//
// Guarantees, and nothing more: data lands only in windows; puts are unordered among themselves
// unless a signal or flush orders them; a receiver learns of data only through a signal. Signals
// are counters: senders add, the receiver waits for what it expects and consumes it, so a
// sender that runs one call ahead only leaves its additions for the next wait.
//
// The engine behind the seam is chosen per group (impl/loopback.cuh: ranks that share a device
// or a host, with an optional NIC model). Every lane of a warp calls each member with the same
// arguments.
#pragma once

#include <cstdint>

#include "runtime/device_context.hpp"
#include "transport/impl/gin.cuh"
#include "transport/impl/loopback.cuh"
#include "transport/signal.cuh"

namespace moecomm::transport::rdma {

// With the GIN engine built in, each call first asks which engine the group chose (a run-time
// value of the context); without it the loopback code is all there is.
#ifdef MOECOMM_WITH_NCCL_GIN
#define MOECOMM_GIN_OR(gin_call)                               \
  if (ctx_.rdma.engine == ::moecomm::detail::kRdmaEngineGin) { \
    gin_call;                                                  \
    return;                                                    \
  }
#else
#define MOECOMM_GIN_OR(gin_call)
#endif

/// One warp's port to the engine. It remembers the bytes put since its last signal or flush (the
/// NIC model charges them there) and the signals it still has to deliver (signal_later).
class WarpPort {
 public:
  /// Signals a warp may hold back while the modelled NIC carries their data.
  static constexpr int kDeferredSignals = 8;

  __device__ explicit WarpPort(const RankContext& ctx) : ctx_(ctx) {}

  /// Starts copying `bytes` (a multiple of 16) from this rank's window at `src` to `peer`'s
  /// window at `dst` (byte offsets from each window's start).
  __device__ void put(int peer, uint64_t dst, uint64_t src, uint64_t bytes) {
    MOECOMM_GIN_OR(gin::put(ctx_, peer, dst, src, bytes))
    loopback::put(ctx_, peer, dst, src, bytes);
    pending_ += bytes;
  }
  /// Puts one u64 value (from a register) at `peer`'s window offset `dst` (8-byte aligned).
  __device__ void put_value(int peer, uint64_t dst, uint64_t value) {
    MOECOMM_GIN_OR(gin::put_value(ctx_, peer, dst, value))
    loopback::put_value(ctx_, peer, dst, value);
    pending_ += sizeof(uint64_t);
  }
  /// Adds `value` to the signal word at `peer`'s window offset `sig`, once every earlier put of
  /// this warp to `peer` has landed.
  __device__ void signal(int peer, uint64_t sig, uint64_t value) {
    MOECOMM_GIN_OR(gin::signal(ctx_, peer, sig, value))
    flush();
    loopback::signal(ctx_, peer, sig, value);
  }
  __device__ void put_signal(int peer, uint64_t dst, uint64_t src, uint64_t bytes, uint64_t sig,
                             uint64_t value) {
    put(peer, dst, src, bytes);
    signal(peer, sig, value);
  }
  /// signal(), delivered once the modelled NIC has carried the warp's puts so far; the warp goes
  /// on meanwhile (at most kDeferredSignals held back; the oldest is delivered first).
  __device__ void signal_later(int peer, uint64_t sig, uint64_t value) {
    MOECOMM_GIN_OR(gin::signal(ctx_, peer, sig, value))  // the NIC orders it after the data
    if (!ctx_.rdma.nic_model) {
      loopback::signal(ctx_, peer, sig, value);
      pending_ = 0;
      return;
    }
    const uint64_t due = loopback::reserve(ctx_, pending_);
    pending_ = 0;
    if (held_ == kDeferredSignals) deliver_oldest();
    held_signal_[(first_ + held_) % kDeferredSignals] = {peer, sig, value, due};
    ++held_;
    deliver_due();
  }
  __device__ void put_signal_later(int peer, uint64_t dst, uint64_t src, uint64_t bytes,
                                   uint64_t sig, uint64_t value) {
    put(peer, dst, src, bytes);
    signal_later(peer, sig, value);
  }
  /// Delivers the held signals whose data the modelled NIC has carried by now (in order).
  __device__ void deliver_due() {
    while (held_ > 0 && device::global_timer_ns_warp() >= held_signal_[first_].due)
      deliver_oldest();
  }
  /// Every put of this warp has landed at its destination and every held signal is delivered.
  __device__ void flush() {
    MOECOMM_GIN_OR(gin::flush(ctx_))
    loopback::complete(ctx_, pending_);
    pending_ = 0;
    while (held_ > 0) deliver_oldest();
  }

 private:
  struct HeldSignal {
    int peer;
    uint64_t sig, value, due;
  };
  __device__ void deliver_oldest() {
    const HeldSignal& h = held_signal_[first_];
    loopback::wait_until(h.due);
    loopback::signal(ctx_, h.peer, h.sig, h.value);
    first_ = (first_ + 1) % kDeferredSignals;
    --held_;
  }

  const RankContext& ctx_;
  uint64_t pending_ = 0;
  HeldSignal held_signal_[kDeferredSignals];
  int first_ = 0, held_ = 0;
};

/// This rank's signal word at window offset `sig`.
__device__ __forceinline__ uint64_t* signal_word(const RankContext& ctx, uint64_t sig) {
  return peer_region<uint64_t>(ctx, ctx.rank, sig);
}

/// One thread: waits until this rank's signal at `sig` reaches `target` (`peer` is the rank
/// expected to signal: a stall names it, its node follows from the group's shape). False after a
/// failed wait (the stall is recorded).
__device__ __forceinline__ bool wait_signal(const RankContext& ctx, uint64_t sig, uint64_t target,
                                            int peer, Phase phase, int channel) {
  return wait_geq(ctx, signal_word(ctx, sig), target, peer, phase, channel);
}

/// Every lane of a warp that may hold signals (signal_later): waits until this rank's signal at
/// `sig` reaches `target`, delivering the warp's held signals as they fall due meanwhile (a peer
/// may be waiting for them while this warp waits for it). Bounded like wait_signal; does not
/// consume. False after a failed wait (recorded as a stall naming `peer`).
__device__ inline bool wait_signal_delivering(const RankContext& ctx, WarpPort& port, uint64_t sig,
                                              uint64_t target, int peer, Phase phase, int channel) {
  const uint64_t* word = signal_word(ctx, sig);
  const bool leader = (threadIdx.x & 31) == 0;
  const uint64_t start = device::global_timer_ns_warp();
  for (uint32_t spin = 0;; ++spin) {
    const uint64_t v =
        __shfl_sync(0xffffffffu, leader ? scope(ctx).load_acquire(word) : uint64_t{0}, 0);
    if (v >= target) {
      __syncwarp();  // the leader's acquire orders every lane's reads of what was signalled
      return true;
    }
    port.deliver_due();
    if ((spin & 63u) == 63u) {
      if (aborted(ctx)) return false;
      if (device::global_timer_ns_warp() - start > ctx.timeout_ns) {
        // One last look (see wait_geq): the value may have arrived while the warp was off.
        const uint64_t last =
            __shfl_sync(0xffffffffu, leader ? scope(ctx).load_acquire(word) : uint64_t{0}, 0);
        if (last >= target) {
          __syncwarp();
          return true;
        }
        if (leader)
          record_error(ctx, DeviceErrorKind::kStall, peer, phase, channel, target,
                       static_cast<int64_t>(last));
        __syncwarp();
        return false;
      }
    }
  }
}

/// One thread: takes `value` off this rank's signal at `sig` (after waiting for it).
__device__ __forceinline__ void consume_signal(const RankContext& ctx, uint64_t sig,
                                               uint64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(signal_word(ctx, sig)),
            static_cast<unsigned long long>(0) - value);
}

#undef MOECOMM_GIN_OR

}  // namespace moecomm::transport::rdma
