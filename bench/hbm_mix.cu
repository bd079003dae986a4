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
// A row's destinations are computed once (lane j holds the j-th), then shuffled, as dispatch does.
// Each runs on 32, 64 and 128 blocks of 512 threads (4, 8 and 16 SMs for each of 8 ranks).
// Usage: hbm_mix [--device D]. Prints GB/s (bytes read + written) and the fraction of the copy
// rate, median of the timed runs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <exception>
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

  const int64_t copy_bytes = rows.bytes();
  const float copy_ms = median_ms([&] {
    MOECOMM_CUDA_CHECK(
        cudaMemcpyAsync(big.get(), rows.get(), copy_bytes, cudaMemcpyDeviceToDevice));
  });
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e6);
  std::printf("hbm_mix on %s: copy rate %.0f GB/s (read + written, %.0f MB copied)\n", prop.name,
              copy_gbps, copy_bytes / 1e6);
  std::printf("%-10s %4s %7s %10s %8s %10s\n", "mix", "fan", "blocks", "GB/s", "% copy", "GB/s/SM");
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      fan_out_quantize_staged, cudaFuncAttributeMaxDynamicSharedMemorySize, kStagingBytes));
  enum Mix { kFanOut, kQuant, kQuantStaged, kQuantInOrder, kQuantStagedInOrder, kFanIn };
  const char* names[] = {"fan-out", "quant", "quant-bulk", "quant-ord", "quant-bulk-ord", "fan-in"};
  for (const Mix mix :
       {kFanOut, kQuant, kQuantStaged, kQuantInOrder, kQuantStagedInOrder, kFanIn}) {
    for (int fan : {1, 2, 4, 6}) {
      for (int blocks : {32, 64, 128}) {
        if (blocks > prop.multiProcessorCount) continue;
        float ms = 0;
        double bytes = 0;
        if (mix != kFanOut && mix != kFanIn) {
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
        std::printf("%-10s %4d %7d %10.0f %7.1f%% %10.1f\n", names[mix], fan, blocks, gbps,
                    100.0 * gbps / copy_gbps, gbps / blocks);
      }
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "hbm_mix: %s\n", e.what());
  return 1;
}
