// Warp-wide row operations shared by the HT and LL kernels: copy a row of 16-byte vectors, or
// quantise a bf16 row to e4m3 with one scale per 128 channels. Where the results go is the
// caller's: a sink functor writes each piece (to one destination or to several).
#pragma once

#include <cstdint>

#include "device/memory_model.cuh"
#include "device/numerics.cuh"

namespace moecomm::device {

inline constexpr int kWarpLanes = 32;
inline constexpr int kBf16PerVector = 8;                         // bf16 in 16 bytes
inline constexpr int kLanesPerFp8Group = 128 / kBf16PerVector;  // a half-warp per scale group
inline constexpr int kFp8GroupsPerWarp = kWarpLanes / kLanesPerFp8Group;
inline constexpr int kRowCopyUnroll = 4;   // 16-byte loads in flight per lane while copying
inline constexpr int kQuantizeUnroll = 4;  // group pairs loaded before they are processed

/// Copies n16 vectors from src: sink(i, v) stores vector i. Loop bounds are warp-uniform, so a
/// sink may use warp collectives; `valid` tells whether vector i exists.
template <typename Sink>
__device__ __forceinline__ void copy_vectors(const int4* src, int n16, int lane, Sink&& sink) {
  for (int base = 0; base < n16; base += kWarpLanes * kRowCopyUnroll) {
    int4 v[kRowCopyUnroll];
#pragma unroll
    for (int u = 0; u < kRowCopyUnroll; ++u) {
      const int i = base + u * kWarpLanes + lane;
      if (i < n16) v[u] = ld_stream_16(src + i);
    }
    sink(base, v);
  }
}

/// Quantises `groups` groups of 128 bf16 channels from src. For each group g and lane:
/// sink(g, sub, q, scale, valid) with q the lane's 8 e4m3 bytes at channel sub * 8 of the group.
/// All lanes call the sink (valid is false past the last group), so sinks may shuffle.
template <typename Sink>
__device__ __forceinline__ void quantize_groups(const int4* src, int groups, bool pow2, int lane,
                                                Sink&& sink) {
  const int half = lane / kLanesPerFp8Group, sub = lane % kLanesPerFp8Group;
  for (int g0 = 0; g0 < groups; g0 += kFp8GroupsPerWarp * kQuantizeUnroll) {
    int4 v[kQuantizeUnroll];
#pragma unroll
    for (int u = 0; u < kQuantizeUnroll; ++u) {
      const int g = g0 + u * kFp8GroupsPerWarp + half;
      v[u] = g < groups ? ld_stream_16(src + g * kLanesPerFp8Group + sub) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kQuantizeUnroll; ++u) {
      const int g = g0 + u * kFp8GroupsPerWarp + half;
      float f[kBf16PerVector];
      unpack_bf16x8(v[u], f);
      const float amax = half_warp_max(abs_max8(f));  // zeros past the end: harmless
      float scale, inv;
      fp8_scale(amax, pow2, scale, inv);
      sink(g, sub, quantize_fp8x8(f, inv), scale, g < groups);
    }
  }
}

}  // namespace moecomm::device
