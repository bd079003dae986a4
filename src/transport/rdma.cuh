// The RDMA engine seam: how a rank reaches ranks on other nodes. Ranks of one node keep loads and
// stores (transport/signal.cuh); ranks on different nodes talk only through these calls, which
// touch nothing but the peers' RDMA windows (the first Config::rdma_bytes of each symmetric
// buffer). The calls mirror what an RDMA NIC driven from the GPU offers (NCCL's GIN, IBGDA):
//
//   put         copy bytes from this rank's window to a peer's window; returns at once.
//   signal      add to a u64 signal word in a peer's window, after this warp's earlier puts to
//               that peer have landed (put_signal: both).
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
#include "transport/impl/loopback.cuh"
#include "transport/signal.cuh"

namespace moecomm::transport::rdma {

/// One warp's port to the engine. It remembers the bytes put since its last signal or flush (the
/// NIC model charges them there).
class WarpPort {
 public:
  __device__ explicit WarpPort(const RankContext& ctx) : ctx_(ctx) {}

  /// Starts copying `bytes` (a multiple of 16) from this rank's window at `src` to `peer`'s
  /// window at `dst` (byte offsets from each window's start).
  __device__ void put(int peer, uint64_t dst, uint64_t src, uint64_t bytes) {
    loopback::put(ctx_, peer, dst, src, bytes);
    pending_ += bytes;
  }
  /// Puts one u64 value (from a register) at `peer`'s window offset `dst` (8-byte aligned).
  __device__ void put_value(int peer, uint64_t dst, uint64_t value) {
    loopback::put_value(ctx_, peer, dst, value);
    pending_ += sizeof(uint64_t);
  }
  /// Adds `value` to the signal word at `peer`'s window offset `sig`, once every earlier put of
  /// this warp to `peer` has landed.
  __device__ void signal(int peer, uint64_t sig, uint64_t value) {
    loopback::complete(ctx_, pending_);
    pending_ = 0;
    loopback::signal(ctx_, peer, sig, value);
  }
  __device__ void put_signal(int peer, uint64_t dst, uint64_t src, uint64_t bytes, uint64_t sig,
                             uint64_t value) {
    put(peer, dst, src, bytes);
    signal(peer, sig, value);
  }
  /// Every put of this warp has landed at its destination.
  __device__ void flush() {
    loopback::complete(ctx_, pending_);
    pending_ = 0;
  }

 private:
  const RankContext& ctx_;
  uint64_t pending_ = 0;
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

/// One thread: takes `value` off this rank's signal at `sig` (after waiting for it).
__device__ __forceinline__ void consume_signal(const RankContext& ctx, uint64_t sig,
                                               uint64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(signal_word(ctx, sig)),
            static_cast<unsigned long long>(0) - value);
}

}  // namespace moecomm::transport::rdma
