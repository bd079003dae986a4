// hbm_mix: how fast the GPU's memory moves the traffic mixes of dispatch and combine, with the
// SMs a group of 8 ranks gives them. ep_bench's "% copy" divides by the device-to-device copy
// rate (one byte read per byte written); dispatch writes each row it reads to several ranks and
// combine reads several rows per row it writes, so their floors are the rates of those mixes:
//   fan-out N: a warp reads a 14336-byte bf16 row and writes half its size (the fp8 row) to N
//              rows spread over the buffer (dispatch with N destination ranks);
//   fan-in N:  a warp reads N 14336-byte rows spread over the buffer and writes one (combine).
//   quant N:   fan-out N where the warp quantises the row to e4m3 on the way, with the library's
//              own quantize_groups (device/row_ops.cuh) and a scale per 128 channels written
//              beside each destination row: HT dispatch's fp8 path without its routing.
//   quant-bulk N: quant N with the rows leaving through a staging ring in shared memory, one
//              bulk (TMA) store per destination and step (device/row_ops.cuh's
//              quantize_row_staged, as HT dispatch writes them).
//   quant-ord, quant-bulk-ord: the same with each destination's rows in a region of their own,
//              row r beside row r + 1, as dispatch lays them out (neighbouring tokens, handled
//              at the same time, land side by side).
//   quant-rt, quant-bulk-rt: quant and quant-bulk with dispatch's routing: each row picks 8 of
//              256 experts (seeded, no repeats), 32 a rank over 8 ranks, and goes to each rank it
//              picked (1 to 8, in rank order); rank d's rows lie in its own region in row order,
//              a row at the number of earlier rows that go to d (dispatch's layout).
//   quant-rt-meta, quant-bulk-rt-meta: the same with dispatch's metadata stored first at every
//              destination: 8 int64 expert ids, 8 float weights and the int32 source row.
// A row's destinations are computed once (lane j holds the j-th), then shuffled, as dispatch does.
// Each runs on 32, 64 and 128 blocks of 512 threads (4, 8 and 16 SMs for each of 8 ranks); the
// routed mixes on 64 and 128, once, with fan 0 in the table and their mean fan-out printed above.
// Usage: hbm_mix [--device D]. Prints GB/s (bytes read + written) and the fraction of the copy
// rate, median of the timed runs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <random>
#include <stdexcept>
#include <vector>

#include "bench_common.hpp"
#include "device/row_ops.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kRowVecs = 14336 / 16;  // a bf16 row of hidden 7168 in 16-byte vectors
constexpr int kOutVecs = kRowVecs / 2;
constexpr int kRows = 8 * 4096;  // rows read (fan-out) or written (fan-in): 8 ranks x 4096 tokens
constexpr int kUnroll = 4;       // 16-byte loads in flight per lane, as the library's row copy
constexpr int kIters = 20;
constexpr int kGroups = kRowVecs * 8 / 128;  // scale groups of 128 channels in a row
constexpr int kQuantizeUnroll = 4;           // as HT dispatch's blocks of <= 512 threads
constexpr int kRanks = 8;                    // routed mixes: destination ranks
constexpr int kExperts = 256;                // experts over the ranks, kExperts / kRanks each
constexpr int kTopk = 8;                     // experts a row picks, without repeats
static_assert(kRanks <= 32 && kTopk <= 32, "a lane holds each destination and each expert");

/// Scatters row r's j-th destination over `rows` rows (a fixed odd multiplier: every row once).
__device__ __forceinline__ int64_t spread(int64_t r, int j, int64_t rows) {
  return (r * 7919 + static_cast<int64_t>(j) * 104729) % rows;
}

/// Where dispatch puts them instead: destination j's rows in a region of their own, row r
/// beside row r + 1 (the rows of neighbouring tokens are written at the same time).
__device__ __forceinline__ int64_t in_order(int64_t r, int j, int64_t rows) {
  return static_cast<int64_t>(j) * (rows / 8) + r;
}

__global__ void __launch_bounds__(kThreads)
    fan_out(const int4* __restrict__ src, int4* __restrict__ dst, int fan, int64_t dst_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    const int4* row = src + r * kRowVecs;
    const int64_t mine = lane < fan ? spread(r, lane, dst_rows) : 0;
    for (int base = 0; base < kOutVecs; base += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kOutVecs) {  // two input vectors make one output vector (bf16 -> fp8)
          const int4 a = row[2 * i], b = row[2 * i + 1];
          v[u] = make_int4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
        }
      }
      for (int j = 0; j < fan; ++j) {
        int4* out = dst + __shfl_sync(0xffffffffu, mine, j) * kOutVecs;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i < kOutVecs) out[i] = v[u];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    fan_out_quantize(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                     float* __restrict__ scales, int fan, int64_t dst_rows, bool adjacent) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    const int64_t mine =
        lane < fan ? (adjacent ? in_order(r, lane, dst_rows) : spread(r, lane, dst_rows)) : 0;
    moecomm::device::quantize_groups<kQuantizeUnroll>(
        src + r * kRowVecs, kGroups, false, lane,
        [&](int g, int sub, uint4 q, float scale, bool valid) {
          for (int j = 0; j < fan; ++j) {
            const int64_t row = __shfl_sync(0xffffffffu, mine, j);
            if (!valid) continue;
            *reinterpret_cast<uint4*>(dst + row * (kOutVecs * 16) + g * 128 + sub * 16) = q;
            if (sub == 0) scales[row * kGroups + g] = scale;
          }
        });
  }
}

using Staging = moecomm::device::QuantizeStaging<kQuantizeUnroll>;
constexpr int kStagingBytes = kWarpsPerBlock * Staging::kWarpBytes;

/// quant, with the rows leaving through the library's staging ring (bulk stores).
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_staged(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                            float* __restrict__ scales, int fan, int64_t dst_rows, bool adjacent) {
  extern __shared__ __align__(16) uint8_t rings[];
  const int lane = threadIdx.x & 31;
  Staging staging{rings + (threadIdx.x / 32) * Staging::kWarpBytes};
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    moecomm::device::RowDestinations to;
    for (int j = 0; j < fan; ++j) {
      const int64_t row = adjacent ? in_order(r, j, dst_rows) : spread(r, j, dst_rows);
      to.add(dst + row * (kOutVecs * 16), scales + row * kGroups, lane);
    }
    moecomm::device::quantize_row_staged<kQuantizeUnroll>(src + r * kRowVecs, kGroups, false, lane,
                                                          staging, to);
  }
  moecomm::device::bulk_wait_all();
}

/// The routed mixes' table: row r goes to counts[r] destinations, the j-th at output row
/// rows[r * kRanks + j] (ranks in ascending order, each rank's region offset included).
struct Routes {
  const int64_t* rows;
  const int32_t* counts;
};

/// Dispatch's metadata regions, kRanks * kRows rows each: kTopk expert ids and weights a row,
/// and its source row.
struct Metadata {
  int64_t* topk_idx;
  float* weights;
  int32_t* src_token;
};

/// Row r's destinations from the table: the count (the same in every lane) and, in lane j < n,
/// the j-th output row.
__device__ __forceinline__ int load_route(const Routes& routes, int64_t r, int lane,
                                          int64_t& mine) {
  const int n = routes.counts[r];
  mine = lane < n ? routes.rows[r * kRanks + lane] : 0;
  return n;
}

/// Row r's metadata to each of its n destinations with plain stores, as dispatch_token writes
/// them before the row. The values are placeholders (the stores, not the values, are measured).
__device__ __forceinline__ void store_metadata(const Metadata& meta, int64_t r, int n, int64_t mine,
                                               int lane) {
  for (int j = 0; j < n; ++j) {  // warp-uniform: every lane takes part in the shuffle
    const int64_t row = __shfl_sync(0xffffffffu, mine, j);
    if (lane < kTopk) {
      meta.topk_idx[row * kTopk + lane] = lane;
      meta.weights[row * kTopk + lane] = 1.0f / kTopk;
    }
    if (lane == 0) meta.src_token[row] = static_cast<int32_t>(r);
  }
}

/// quant with the destinations from the routing table, and dispatch's metadata if `meta`.
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_routed(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                            float* __restrict__ scales, Routes routes, Metadata metadata,
                            bool meta) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    int64_t mine;
    const int n = load_route(routes, r, lane, mine);
    if (meta) store_metadata(metadata, r, n, mine, lane);
    moecomm::device::quantize_groups<kQuantizeUnroll>(
        src + r * kRowVecs, kGroups, false, lane,
        [&](int g, int sub, uint4 q, float scale, bool valid) {
          for (int j = 0; j < n; ++j) {
            const int64_t row = __shfl_sync(0xffffffffu, mine, j);
            if (!valid) continue;
            *reinterpret_cast<uint4*>(dst + row * (kOutVecs * 16) + g * 128 + sub * 16) = q;
            if (sub == 0) scales[row * kGroups + g] = scale;
          }
        });
  }
}

/// quant-bulk with the destinations from the routing table, and dispatch's metadata if `meta`.
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_staged_routed(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                                   float* __restrict__ scales, Routes routes, Metadata metadata,
                                   bool meta) {
  extern __shared__ __align__(16) uint8_t rings[];
  const int lane = threadIdx.x & 31;
  Staging staging{rings + (threadIdx.x / 32) * Staging::kWarpBytes};
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    int64_t mine;
    const int n = load_route(routes, r, lane, mine);
    if (meta) store_metadata(metadata, r, n, mine, lane);
    moecomm::device::RowDestinations to;
    for (int j = 0; j < n; ++j) {
      const int64_t row = __shfl_sync(0xffffffffu, mine, j);
      to.add(dst + row * (kOutVecs * 16), scales + row * kGroups, lane);
    }
    moecomm::device::quantize_row_staged<kQuantizeUnroll>(src + r * kRowVecs, kGroups, false, lane,
                                                          staging, to);
  }
  moecomm::device::bulk_wait_all();
}

/// The routed mixes' table on the host: each row picks kTopk distinct experts (a seeded
/// generator), goes to the ranks that own them, and lands at each such rank d in d's region at
/// the number of earlier rows that go to d.
struct RoutingTable {
  std::vector<int64_t> rows = std::vector<int64_t>(int64_t{kRows} * kRanks, 0);
  std::vector<int32_t> counts = std::vector<int32_t>(kRows, 0);
  int64_t destinations = 0;  // sum of the counts
};

RoutingTable make_routing_table() {
  RoutingTable t;
  std::mt19937 rng(12345);
  int64_t next[kRanks] = {};  // rows each rank has received so far
  for (int64_t r = 0; r < kRows; ++r) {
    bool picked[kExperts] = {};
    unsigned ranks = 0;
    for (int k = 0; k < kTopk; ++k) {
      int e;
      do {
        e = static_cast<int>(rng() % kExperts);  // 2^32 is a multiple of kExperts: no bias
      } while (picked[e]);
      picked[e] = true;
      ranks |= 1u << (e / (kExperts / kRanks));
    }
    for (int d = 0; d < kRanks; ++d) {
      if (!((ranks >> d) & 1u)) continue;
      t.rows[r * kRanks + t.counts[r]++] = int64_t{d} * kRows + next[d]++;
    }
    t.destinations += t.counts[r];
  }
  return t;
}

__global__ void __launch_bounds__(kThreads)
    fan_in(const int4* __restrict__ src, int4* __restrict__ dst, int fan, int64_t src_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    for (int i = lane; i < kRowVecs; i += 32) {
      int4 acc = make_int4(0, 0, 0, 0);
      int4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < fan) v[j] = src[spread(r, j, src_rows) * kRowVecs + i];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < fan)
          acc = make_int4(acc.x + v[j].x, acc.y + v[j].y, acc.z + v[j].z, acc.w + v[j].w);
      dst[r * kRowVecs + i] = acc;
    }
  }
}

/// Median milliseconds of `iters` runs of launch().
template <typename Launch>
float median_ms(Launch launch) {
  cudaEvent_t start, stop;
  MOECOMM_CUDA_CHECK(cudaEventCreate(&start));
  MOECOMM_CUDA_CHECK(cudaEventCreate(&stop));
  launch();  // warm-up
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(kIters);
  for (float& m : ms) {
    MOECOMM_CUDA_CHECK(cudaEventRecord(start));
    launch();
    MOECOMM_CUDA_CHECK(cudaEventRecord(stop));
    MOECOMM_CUDA_CHECK(cudaEventSynchronize(stop));
    MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[kIters / 2];
}

}  // namespace

int main(int argc, char** argv) try {
  const int device = epb::parse_device_option(argc, argv, "hbm_mix");
  if (device < 0) return 2;
  MOECOMM_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop;
  MOECOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));

  constexpr int kMaxFan = 8;
  const int64_t row_bytes = int64_t{kRowVecs} * 16, out_bytes = int64_t{kOutVecs} * 16;
  // Fan-out writes kRows * fan rows of out_bytes; fan-in reads kRows * fan rows of row_bytes.
  // Sized for the largest fan so that rows are spread over as much memory as the ops touch.
  epb::DeviceBuffer<int4> big(kRows * int64_t{kMaxFan} * kRowVecs);
  epb::DeviceBuffer<int4> rows(int64_t{kRows} * kRowVecs);
  epb::DeviceBuffer<float> scales(big.bytes() / out_bytes * kGroups);  // quant: one per out row
  MOECOMM_CUDA_CHECK(cudaMemset(big.get(), 1, big.bytes()));
  MOECOMM_CUDA_CHECK(cudaMemset(rows.get(), 2, rows.bytes()));

  // Routed mixes: the table, and dispatch's metadata regions (kRanks regions of kRows rows).
  const RoutingTable table = make_routing_table();
  const int64_t routed_rows = int64_t{kRanks} * kRows;
  if (big.bytes() / out_bytes < routed_rows)
    throw std::runtime_error("hbm_mix: the buffer holds fewer output rows than the routed mixes");
  epb::DeviceBuffer<int64_t> route_rows(table.rows.size());
  epb::DeviceBuffer<int32_t> route_counts(table.counts.size());
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(route_rows.get(), table.rows.data(), route_rows.bytes(), cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(cudaMemcpy(route_counts.get(), table.counts.data(), route_counts.bytes(),
                                cudaMemcpyHostToDevice));
  epb::DeviceBuffer<int64_t> meta_idx(routed_rows * kTopk);
  epb::DeviceBuffer<float> meta_weights(routed_rows * kTopk);
  epb::DeviceBuffer<int32_t> meta_src(routed_rows);
  const Routes routes{route_rows.get(), route_counts.get()};
  const Metadata metadata{meta_idx.get(), meta_weights.get(), meta_src.get()};

  const int64_t copy_bytes = rows.bytes();
  const float copy_ms = median_ms([&] {
    MOECOMM_CUDA_CHECK(
        cudaMemcpyAsync(big.get(), rows.get(), copy_bytes, cudaMemcpyDeviceToDevice));
  });
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e6);
  std::printf("hbm_mix on %s: copy rate %.0f GB/s (read + written, %.0f MB copied)\n", prop.name,
              copy_gbps, copy_bytes / 1e6);
  std::printf("routed mixes: mean fan-out %.2f (top-%d of %d experts over %d ranks)\n",
              static_cast<double>(table.destinations) / kRows, kTopk, kExperts, kRanks);
  std::printf("%-18s %4s %7s %10s %8s %10s\n", "mix", "fan", "blocks", "GB/s", "% copy", "GB/s/SM");
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      fan_out_quantize_staged, cudaFuncAttributeMaxDynamicSharedMemorySize, kStagingBytes));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      fan_out_quantize_staged_routed, cudaFuncAttributeMaxDynamicSharedMemorySize, kStagingBytes));
  enum Mix {
    kFanOut,
    kQuant,
    kQuantStaged,
    kQuantInOrder,
    kQuantStagedInOrder,
    kFanIn,
    kQuantRouted,
    kQuantStagedRouted,
    kQuantRoutedMeta,
    kQuantStagedRoutedMeta
  };
  const char* names[] = {
      "fan-out", "quant",    "quant-bulk",    "quant-ord",     "quant-bulk-ord",
      "fan-in",  "quant-rt", "quant-bulk-rt", "quant-rt-meta", "quant-bulk-rt-meta"};
  const std::vector<int> fixed_fans = {1, 2, 4, 6}, routed_fans = {0};
  for (const Mix mix :
       {kFanOut, kQuant, kQuantStaged, kQuantInOrder, kQuantStagedInOrder, kFanIn, kQuantRouted,
        kQuantStagedRouted, kQuantRoutedMeta, kQuantStagedRoutedMeta}) {
    const bool routed = mix >= kQuantRouted;
    for (int fan : routed ? routed_fans : fixed_fans) {
      for (int blocks : {32, 64, 128}) {
        if (blocks > prop.multiProcessorCount || (routed && blocks == 32)) continue;
        float ms = 0;
        double bytes = 0;
        if (routed) {
          auto* dst = reinterpret_cast<uint8_t*>(big.get());
          const bool meta = mix == kQuantRoutedMeta || mix == kQuantStagedRoutedMeta;
          ms = median_ms([&] {
            if (mix == kQuantRouted || mix == kQuantRoutedMeta) {
              fan_out_quantize_routed<<<blocks, kThreads>>>(rows.get(), dst, scales.get(), routes,
                                                            metadata, meta);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize_routed");
            } else {
              fan_out_quantize_staged_routed<<<blocks, kThreads, kStagingBytes>>>(
                  rows.get(), dst, scales.get(), routes, metadata, meta);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize_staged_routed");
            }
          });
          // Metadata a destination: kTopk int64 ids, kTopk float weights, an int32 source row.
          const double meta_bytes = meta ? kTopk * (8.0 + 4.0) + 4.0 : 0.0;
          bytes =
              kRows * static_cast<double>(row_bytes) +
              static_cast<double>(table.destinations) * (out_bytes + 4.0 * kGroups + meta_bytes);
        } else if (mix != kFanOut && mix != kFanIn) {
          const int64_t dst_rows = big.bytes() / out_bytes;
          auto* dst = reinterpret_cast<uint8_t*>(big.get());
          const bool adjacent = mix == kQuantInOrder || mix == kQuantStagedInOrder;
          ms = median_ms([&] {
            if (mix == kQuant || mix == kQuantInOrder) {
              fan_out_quantize<<<blocks, kThreads>>>(rows.get(), dst, scales.get(), fan, dst_rows,
                                                     adjacent);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize");
            } else {
              fan_out_quantize_staged<<<blocks, kThreads, kStagingBytes>>>(
                  rows.get(), dst, scales.get(), fan, dst_rows, adjacent);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize_staged");
            }
          });
          bytes = kRows * (row_bytes + static_cast<double>(fan) * (out_bytes + 4.0 * kGroups));
        } else if (mix == kFanOut) {
          const int64_t dst_rows = big.bytes() / out_bytes;
          ms = median_ms([&] {
            fan_out<<<blocks, kThreads>>>(rows.get(), big.get(), fan, dst_rows);
            MOECOMM_LAUNCH_CHECK("fan_out");
          });
          bytes = kRows * (row_bytes + static_cast<double>(fan) * out_bytes);
        } else {
          const int64_t src_rows = big.bytes() / row_bytes;
          ms = median_ms([&] {
            fan_in<<<blocks, kThreads>>>(big.get(), rows.get(), fan, src_rows);
            MOECOMM_LAUNCH_CHECK("fan_in");
          });
          bytes = kRows * (static_cast<double>(fan) * row_bytes + row_bytes);
        }
        const double gbps = bytes / (ms * 1e6);
        std::printf("%-18s %4d %7d %10.0f %7.1f%% %10.1f\n", names[mix], fan, blocks, gbps,
                    100.0 * gbps / copy_gbps, gbps / blocks);
      }
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "hbm_mix: %s\n", e.what());
  return 1;
}
