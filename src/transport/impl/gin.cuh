// The NCCL GIN engine's device side (GPU-initiated networking, NCCL >= 2.32): the seam's calls
// (transport/rdma.cuh) mapped onto ncclGin. The whole symmetric buffer is one NCCL window
// (ctx.rdma.gin_window), so the seam's window offsets are NCCL window offsets, and the seam's
// signal words (u64 at window offsets) are NCCL VA signals. Compiled only with
// MOECOMM_WITH_NCCL_GIN; chosen at run time by ctx.rdma.engine.
//
//   put        ncclGin::put, warp-cooperative, no completion action
//   put_value  ncclGin::putValue
//   signal     ncclGin::signal with a strong VA signal add: visible only after every earlier put
//              of this context (this warp's) to that peer has settled, which is the seam's rule
//   flush      ncclGin::flush: the warp's sources may be reused. Remote visibility comes only
//              through signals, as the seam promises (nothing stronger is needed by a receiver).
#pragma once

#ifdef MOECOMM_WITH_NCCL_GIN

#include <nccl_device.h>

#include <cstdint>

#include "runtime/device_context.hpp"
#include "transport/impl/loopback.cuh"

namespace moecomm::transport::gin {

__device__ __forceinline__ const ncclDevComm& dev_comm(const RankContext& ctx) {
  return *static_cast<const ncclDevComm*>(ctx.rdma.gin_comm);
}
__device__ __forceinline__ ncclWindow_t window(const RankContext& ctx) {
  return static_cast<ncclWindow_t>(ctx.rdma.gin_window);
}
/// This warp's GIN context: warps share NCCL's contexts round-robin (one queue pair per peer
/// each), and a warp keeps one, so its signals follow its own puts.
__device__ __forceinline__ ncclGin context(const RankContext& ctx) {
  const int warp = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32);
  return ncclGin(dev_comm(ctx), warp);
}

/// Every lane: starts copying bytes from this rank's window at src to the peer's at dst.
__device__ __forceinline__ void put(const RankContext& ctx, int peer, uint64_t dst, uint64_t src,
                                    uint64_t bytes) {
  if (!loopback::in_window(ctx, dst, bytes) || !loopback::in_window(ctx, src, bytes)) return;
  const ncclGin gin = context(ctx);
  gin.put(ncclTeamWorld(dev_comm(ctx)), peer, window(ctx), dst, window(ctx), src, bytes,
          ncclGin_None{}, ncclGin_None{}, ncclCoopWarp{});
}

__device__ __forceinline__ void put_value(const RankContext& ctx, int peer, uint64_t dst,
                                          uint64_t value) {
  if (!loopback::in_window(ctx, dst, sizeof(uint64_t))) return;
  const ncclGin gin = context(ctx);
  gin.putValue(ncclTeamWorld(dev_comm(ctx)), peer, window(ctx), dst, value, ncclGin_None{},
               ncclCoopWarp{});
}

/// Every lane: adds value to the peer's signal word at window offset sig, after this warp's
/// earlier puts to that peer.
__device__ __forceinline__ void signal(const RankContext& ctx, int peer, uint64_t sig,
                                       uint64_t value) {
  if (!loopback::in_window(ctx, sig, sizeof(uint64_t))) return;
  const ncclGin gin = context(ctx);
  gin.signal(ncclTeamWorld(dev_comm(ctx)), peer,
             ncclGin_StrongVASignalAdd{window(ctx), static_cast<size_t>(sig), value},
             ncclCoopWarp{});
}

/// Every lane: the warp's puts have left their sources.
__device__ __forceinline__ void flush(const RankContext& ctx) {
  context(ctx).flush(ncclCoopWarp{});
}

}  // namespace moecomm::transport::gin

#endif  // MOECOMM_WITH_NCCL_GIN
