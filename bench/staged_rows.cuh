// hbm_mix's staged mixes: quantised rows leaving through a warp's ring of shared-memory slots in
// bulk (TMA) stores, one per destination and step. HT dispatch wrote its rows this way at few SMs
// a rank until register stores with the destinations' addresses worked out once a row overtook it
// (bench/NOTES.md v26); the mixes keep it as the measured alternative.
#pragma once

#include <cstdint>

#include "device/memory_model.cuh"
#include "device/row_ops.cuh"

namespace epb {

using moecomm::device::bulk_commit;
using moecomm::device::bulk_store;
using moecomm::device::bulk_wait_read;
using moecomm::device::fence_shared_to_bulk;
using moecomm::device::kChannelsPerLane;
using moecomm::device::kFp8GroupsPerWarp;
using moecomm::device::kWarpLanes;
using moecomm::device::quantize_groups;
using moecomm::device::RowDestinations;

/// One warp's ring of shared-memory slots through which quantised rows leave in bulk stores: the
/// warp quantises a step of Unroll * 4 groups into a slot, then each destination gets the step's
/// bytes (and scales) in one bulk store, issued by the lane that holds it. The lanes go on to the
/// next step's loads at once; a slot is written again only once the stores that read it have.
/// Rows on one ring must not interleave; bulk_wait_all() before the rows are published.
template <int Unroll>
struct QuantizeStaging {
  static constexpr int kSlots = 2;
  static constexpr int kStepGroups = Unroll * kFp8GroupsPerWarp;
  static constexpr int kStepBytes = kStepGroups * 128;
  static constexpr int kSlotBytes = kStepBytes + kStepGroups * static_cast<int>(sizeof(float));
  static constexpr int kWarpBytes = kSlots * kSlotBytes;  // shared memory a warp needs
  static_assert(kSlotBytes % 16 == 0, "bulk copies move 16-byte aligned pieces");

  uint8_t* ring;      // kWarpBytes of shared memory, 16-byte aligned
  uint32_t step = 0;  // steps staged so far on this ring

  __device__ __forceinline__ uint8_t* slot() const { return ring + (step % kSlots) * kSlotBytes; }
};

/// Quantises a bf16 row of `groups` groups (as quantize_groups) and writes it to every
/// destination through the staging ring. Scales go in bulk too where a row's scales are whole
/// 16-byte vectors (groups % 4 == 0); otherwise each is stored on its own.
template <int Unroll>
__device__ __forceinline__ void quantize_row_staged(const int4* src, int groups, bool pow2,
                                                    int lane, QuantizeStaging<Unroll>& staging,
                                                    const RowDestinations& to) {
  using Staging = QuantizeStaging<Unroll>;
  const bool bulk_scales = groups % kFp8GroupsPerWarp == 0;
  struct Steps {
    Staging& staging;
    const RowDestinations& to;
    int groups;
    bool bulk_scales;
    int lane;

    __device__ __forceinline__ void begin(int) const {
      bulk_wait_read<Staging::kSlots - 1>();  // this step's slot is free in every lane
      __syncwarp();
    }
    __device__ __forceinline__ void end(int g0) const {
      fence_shared_to_bulk();
      __syncwarp();
      const uint8_t* slot = staging.slot();
      const int n = min(Staging::kStepGroups, groups - g0);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (lane + h * kWarpLanes >= to.count) break;
        bulk_store(to.data[h] + g0 * 128, slot, n * 128);
        if (bulk_scales)
          bulk_store(to.scales[h] + g0, slot + Staging::kStepBytes,
                     n * static_cast<int>(sizeof(float)));
      }
      bulk_commit();
      ++staging.step;
    }
  };
  quantize_groups<Unroll>(
      src, groups, pow2, lane,
      [&](int g, int sub, uint4 q, float scale, bool valid) {
        uint8_t* slot = staging.slot();
        const int c = g % Staging::kStepGroups;  // the group within the step
        if (valid) {
          *reinterpret_cast<uint4*>(slot + c * 128 + sub * kChannelsPerLane) = q;
          if (sub == 0 && bulk_scales)
            reinterpret_cast<float*>(slot + Staging::kStepBytes)[c] = scale;
        }
        if (!bulk_scales) {
          for (int k = 0; k < to.count; ++k) {
            float* row = to.scales_of(k);
            if (valid && sub == 0) row[g] = scale;
          }
        }
      },
      Steps{staging, to, groups, bulk_scales, lane});
}

}  // namespace epb
