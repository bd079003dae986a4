// Warp-wide row operations shared by the HT and LL kernels: copy a row of 16-byte vectors, or
// quantise a bf16 row to e4m3 with one scale per 128 channels. Where the results go is the
// caller's: a sink functor writes each piece (to one destination or to several).
#pragma once

#include <cstdint>

#include "device/block.cuh"
#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "runtime/register_budget.hpp"

namespace moecomm::device {

inline constexpr int kBf16PerVec = 8;        // bf16 in 16 bytes
inline constexpr int kChannelsPerLane = 16;  // two bf16 vectors in, one 16-byte e4m3 vector out
inline constexpr int kLanesPerFp8Group = 128 / kChannelsPerLane;  // 8 lanes per scale group
inline constexpr int kFp8GroupsPerWarp = kWarpLanes / kLanesPerFp8Group;
inline constexpr int kRowCopyUnroll = 4;   // 16-byte loads in flight per lane while copying
inline constexpr int kQuantizeUnroll = 2;  // steps of 4 groups loaded before they are processed

/// The quantize_groups steps a warp loads at once in a kernel built for blocks of `block_threads`:
/// twice the default (4 KB a warp) with 128 registers a thread (blocks of up to
/// kWideBlockThreads), where more bytes in flight bring the rows closer to the memory's rate
/// (HT dispatch: bench/NOTES.md v20; LL dispatch's fan-out-ll mix: 84 % of the copy rate against
/// 81 %, v28); the default with 64 registers, where more would spill.
constexpr int quantize_load_steps(int block_threads) {
  return block_threads <= detail::kWideBlockThreads ? 2 * kQuantizeUnroll : kQuantizeUnroll;
}

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

/// Max over the 8 lanes that hold one 128-channel group.
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int off = kLanesPerFp8Group / 2; off >= 1; off >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

/// quantize_groups' hooks around a step, for sinks that need none.
struct NoSteps {
  __device__ void begin(int) const {}
  __device__ void end(int) const {}
};

/// Quantises `groups` groups of 128 bf16 channels from src, 8 lanes per group, 16 channels per
/// lane. For each group g and lane: sink(g, sub, q, scale, valid) with q the lane's 16 e4m3 bytes
/// at channel sub * 16 of the group. All lanes call the sink (valid is false past the last group),
/// so sinks may shuffle. `Unroll` steps of kFp8GroupsPerWarp groups are loaded before any is
/// processed (more bytes in flight, more registers). Around each such step every lane calls
/// steps.begin(g0) once its loads are issued and steps.end(g0) after its last sink.
template <int Unroll = kQuantizeUnroll, typename Sink, typename Steps = NoSteps>
__device__ __forceinline__ void quantize_groups(const int4* src, int groups, bool pow2, int lane,
                                                Sink&& sink, Steps&& steps = Steps{}) {
  const int slot = lane / kLanesPerFp8Group, sub = lane % kLanesPerFp8Group;
  constexpr int kVectorsPerGroup = 128 / kBf16PerVec;
  for (int g0 = 0; g0 < groups; g0 += kFp8GroupsPerWarp * Unroll) {
    int4 v[Unroll][2];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int g = g0 + u * kFp8GroupsPerWarp + slot;
      const int4* p = src + g * kVectorsPerGroup + sub * 2;
      v[u][0] = g < groups ? ld_stream_16(p) : make_int4(0, 0, 0, 0);
      v[u][1] = g < groups ? ld_stream_16(p + 1) : make_int4(0, 0, 0, 0);
    }
    steps.begin(g0);
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int g = g0 + u * kFp8GroupsPerWarp + slot;
      float lo[kBf16PerVec], hi[kBf16PerVec];
      unpack_bf16x8(v[u][0], lo);
      unpack_bf16x8(v[u][1], hi);
      const float amax = group_max(fmaxf(abs_max8(lo), abs_max8(hi)));  // zeros past the end
      float scale, inv;
      fp8_scale(amax, pow2, scale, inv);
      const uint2 a = quantize_fp8x8(lo, inv), b = quantize_fp8x8(hi, inv);
      sink(g, sub, make_uint4(a.x, a.y, b.x, b.y), scale, g < groups);
    }
    steps.end(g0);
  }
}

/// Where one quantised row goes, as the lanes of a warp hold it: lane k holds the k-th and the
/// (k + 32)-th of `count` destinations (a data row of e4m3 bytes and its row of scales).
struct RowDestinations {
  uint8_t* data[2] = {nullptr, nullptr};
  float* scales[2] = {nullptr, nullptr};
  int count = 0;  // the same in every lane

  /// Adds a destination (every lane calls it, with the same arguments). Indices stay
  /// compile-time constants so that the arrays live in registers.
  __device__ __forceinline__ void add(uint8_t* row_data, float* row_scales, int lane) {
    if ((count & (kWarpLanes - 1)) == lane) {
      if (count < kWarpLanes) {
        data[0] = row_data;
        scales[0] = row_scales;
      } else {
        data[1] = row_data;
        scales[1] = row_scales;
      }
    }
    ++count;
  }
  /// The data row of destination k, in every lane (all lanes take part).
  __device__ __forceinline__ uint8_t* data_of(int k) const {
    const uint8_t* mine = k < kWarpLanes ? data[0] : data[1];
    return reinterpret_cast<uint8_t*>(
        __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(mine), k % kWarpLanes));
  }
  /// The scales of destination k, in every lane (all lanes take part).
  __device__ __forceinline__ float* scales_of(int k) const {
    const float* mine = k < kWarpLanes ? scales[0] : scales[1];
    return reinterpret_cast<float*>(
        __shfl_sync(kFullMask, reinterpret_cast<unsigned long long>(mine), k % kWarpLanes));
  }
};

/// Quantises a bf16 row of `groups` 128-channel groups to e4m3 and stores data and scales at
/// every destination of `to` from registers: a warp instruction per step, destination and piece.
/// The destinations' addresses were worked out once for the row (RowDestinations); working them
/// out at every piece made dispatch's rows stream 20 % slower at 8 SMs a rank.
template <int Unroll = kQuantizeUnroll>
__device__ __forceinline__ void quantize_row_to(const int4* src, int groups, bool pow2,
                                                const RowDestinations& to, int lane) {
  quantize_groups<Unroll>(src, groups, pow2, lane,
                          [&](int g, int sub, uint4 q, float scale, bool valid) {
                            for (int k = 0; k < to.count; ++k) {
                              uint8_t* row = to.data_of(k);  // every lane shuffles
                              float* scales = to.scales_of(k);
                              if (!valid) continue;
                              *reinterpret_cast<uint4*>(row + g * 128 + sub * kChannelsPerLane) = q;
                              if (sub == 0) scales[g] = scale;
                            }
                          });
}

/// Copies a row of n16 16-byte vectors to the data row of every destination of `to`.
__device__ __forceinline__ void copy_row_to(const int4* src, int n16, const RowDestinations& to,
                                            int lane) {
  copy_vectors(src, n16, lane, [&](int base, const int4(&v)[kRowCopyUnroll]) {
    for (int k = 0; k < to.count; ++k) {
      int4* dst = reinterpret_cast<int4*>(to.data_of(k));  // every lane shuffles
#pragma unroll
      for (int u = 0; u < kRowCopyUnroll; ++u) {
        const int i = base + u * kWarpLanes + lane;
        if (i < n16) st_stream_16(dst + i, v[u]);
      }
    }
  });
}

}  // namespace moecomm::device
