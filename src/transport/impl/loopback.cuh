// The loopback RDMA engine: puts and signals between ranks whose windows this GPU can address
// (virtual nodes of one GPU, or processes of one host declared as nodes). A put is a warp-wide
// copy into the peer's window; a signal is a fence then an atomic add. Optionally it models a
// NIC (RdmaContext): the bytes a warp put since its last signal are charged to its rank's NIC
// timeline at the modelled bandwidth, and the signal waits until they would have left the NIC,
// plus the latency. Puts that never stop for a signal are charged at the next flush.
#pragma once

#include <cstdint>

#include "device/memory_model.cuh"
#include "runtime/device_context.hpp"
#include "transport/signal.cuh"

namespace moecomm::transport::loopback {

/// True when [offset, offset + bytes) lies in a window; else the error is recorded.
__device__ __forceinline__ bool in_window(const RankContext& ctx, uint64_t offset, uint64_t bytes) {
  if (offset + bytes <= ctx.rdma.window_bytes && offset + bytes >= offset) return true;
  record_error(ctx, DeviceErrorKind::kRdmaOutOfWindow, -1, Phase::kNone, 0, 0, 0,
               static_cast<int64_t>(offset), static_cast<int64_t>(bytes));
  return false;
}

/// Every lane: copies bytes (a multiple of 16) from this rank's window to the peer's.
__device__ __forceinline__ void put(const RankContext& ctx, int peer, uint64_t dst, uint64_t src,
                                    uint64_t bytes) {
  if (!in_window(ctx, dst, bytes) || !in_window(ctx, src, bytes)) return;
  const int lane = threadIdx.x & 31;
  const int4* from = reinterpret_cast<const int4*>(ctx.peers[ctx.rank] + src);
  int4* to = reinterpret_cast<int4*>(ctx.peers[peer] + dst);
  const uint64_t n16 = bytes / 16;
  __syncwarp();  // the warp's own writes of the source are complete
  constexpr int kUnroll = 4;
  uint64_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n16; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = device::ld_peer_16(from + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) device::st_stream_16(to + i + 32 * u, v[u]);
  }
  for (; i < n16; i += 32) device::st_stream_16(to + i, device::ld_peer_16(from + i));
}

__device__ __forceinline__ void put_value(const RankContext& ctx, int peer, uint64_t dst,
                                          uint64_t value) {
  if (!in_window(ctx, dst, sizeof(uint64_t))) return;
  if ((threadIdx.x & 31) == 0) *reinterpret_cast<uint64_t*>(ctx.peers[peer] + dst) = value;
}

/// Every lane: the global-timer time at which `bytes` put by this warp will have left a modelled
/// NIC, plus the latency (0 without the model or without bytes). The rank's NIC is one timeline
/// (the time it is busy until): a warp's bytes take the next `bytes / bandwidth` of it with one
/// atomic add, so a rank's warps share the modelled bandwidth without contending on a
/// compare-and-swap loop. When the NIC was idle (the timeline lies in the past) the reservation
/// starts now; warps that reserve in the same instant of such a restart may overlap by one
/// reservation each (the model's only slack).
__device__ __forceinline__ uint64_t reserve(const RankContext& ctx, uint64_t bytes) {
  if (!ctx.rdma.nic_model) return 0;
  uint64_t due = 0;
  if ((threadIdx.x & 31) == 0) {
    const uint64_t now = device::global_timer_ns();
    const uint64_t busy = static_cast<uint64_t>(static_cast<double>(bytes) /
                                                static_cast<double>(ctx.rdma.nic_bytes_per_ns));
    auto* word = reinterpret_cast<unsigned long long*>(ctx.rdma.nic_busy_until);
    const uint64_t before = atomicAdd(word, static_cast<unsigned long long>(busy));
    uint64_t end = before + busy;
    if (before < now) {  // the NIC was idle: start now, and move the timeline there
      end = now + busy;
      atomicMax(word, static_cast<unsigned long long>(end));
    }
    due = end + ctx.rdma.nic_latency_ns;
  }
  return __shfl_sync(0xffffffffu, due, 0);
}

/// Every lane: returns once the global timer has passed `due` (bounded: the time is known).
__device__ __forceinline__ void wait_until(uint64_t due) {
  if ((threadIdx.x & 31) == 0)
    while (device::global_timer_ns() < due) {
    }
  __syncwarp();
}

/// Every lane: returns once `bytes` put by this warp would have left a modelled NIC.
__device__ __forceinline__ void complete(const RankContext& ctx, uint64_t bytes) {
  if (ctx.rdma.nic_model) wait_until(reserve(ctx, bytes));
}

/// Every lane: adds `value` to the peer's signal word at `sig` after the warp's earlier writes.
__device__ __forceinline__ void signal(const RankContext& ctx, int peer, uint64_t sig,
                                       uint64_t value) {
  if (!in_window(ctx, sig, sizeof(uint64_t))) return;
  __syncwarp();
  if ((threadIdx.x & 31) == 0) {
    scope(ctx).fence();  // the warp's puts (ordered by the warp barrier) before the signal
    auto* word = reinterpret_cast<unsigned long long*>(ctx.peers[peer] + sig);
    if (ctx.one_gpu)
      atomicAdd(word, static_cast<unsigned long long>(value));
    else
      atomicAdd_system(word, static_cast<unsigned long long>(value));
  }
  __syncwarp();
}

}  // namespace moecomm::transport::loopback
