// ep_bench's kernels. Kept in one small file so that the rest of the benchmark compiles as
// plain C++ (quick CI builds).
#include <cuda_runtime.h>

#include <algorithm>

#include "bench_common.hpp"
#include "kernels.hpp"

namespace epb {
namespace {

constexpr int kThreads = 256;         // threads per block of the copy and reduce kernels
constexpr int64_t kMaxBlocks = 8192;  // grid-stride loops beyond this
constexpr int kBf16PerVector = 8;     // bf16 values in one 16-byte load
constexpr unsigned kGateSleepNs = 200;

__device__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void gate_kernel(const volatile int* open, int* timed_out, uint64_t* released_ns,
                            uint64_t timeout_ns) {
  const uint64_t start = global_timer_ns();
  while (*open == 0) {
    if (global_timer_ns() - start > timeout_ns) {
      *timed_out = 1;
      return;
    }
    __nanosleep(kGateSleepNs);
  }
  *released_ns = global_timer_ns();
}

__global__ void permute_kernel(const uint4* __restrict__ src, const int32_t* __restrict__ src_row,
                               int64_t rows, int64_t vectors_per_row, uint4* __restrict__ dst) {
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const uint4* from = src + src_row[i] * vectors_per_row;
    uint4* to = dst + i * vectors_per_row;
    for (int64_t v = threadIdx.x; v < vectors_per_row; v += blockDim.x) to[v] = from[v];
  }
}

__device__ float bf16_bits_to_float(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

/// Round to nearest even, as the host reference does (no NaN occurs in the benchmark's data).
__device__ uint32_t float_to_bf16_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

__global__ void unpermute_kernel(const uint4* __restrict__ rows,
                                 const int32_t* __restrict__ offsets,
                                 const int32_t* __restrict__ rows_of,
                                 const float* __restrict__ weights, int64_t tokens,
                                 int vectors_per_row, uint4* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int begin = offsets[t], end = offsets[t + 1];
    for (int v = threadIdx.x; v < vectors_per_row; v += blockDim.x) {
      float acc[kBf16PerVector] = {};
      for (int j = begin; j < end; ++j) {
        const uint4 q = rows[static_cast<int64_t>(rows_of[j]) * vectors_per_row + v];
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        for (int i = 0; i < kBf16PerVector; ++i) {
          const uint32_t word = words[i / 2];
          const float x = bf16_bits_to_float(i % 2 == 0 ? word & 0xFFFFu : word >> 16);
          acc[i] = weights ? fmaf(weights[j], x, acc[i]) : acc[i] + x;
        }
      }
      uint32_t packed[4];
      for (int i = 0; i < 4; ++i)
        packed[i] = float_to_bf16_bits(acc[2 * i]) | (float_to_bf16_bits(acc[2 * i + 1]) << 16);
      out[t * vectors_per_row + v] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
  }
}

unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>(items, 1, kMaxBlocks));
}

}  // namespace

void launch_gate(const volatile int* open, int* timed_out, uint64_t* released_ns,
                 uint64_t timeout_ns, cudaStream_t stream) {
  gate_kernel<<<1, 1, 0, stream>>>(open, timed_out, released_ns, timeout_ns);
  MOECOMM_LAUNCH_CHECK("gate_kernel");
}

void launch_permute(const void* src, const int32_t* src_row, int64_t rows, int64_t row_bytes,
                    void* dst, cudaStream_t stream) {
  if (rows == 0) return;
  permute_kernel<<<grid_for(rows), kThreads, 0, stream>>>(
      static_cast<const uint4*>(src), src_row, rows, row_bytes / 16, static_cast<uint4*>(dst));
  MOECOMM_LAUNCH_CHECK("permute_kernel");
}

void launch_unpermute(const uint16_t* rows, const int32_t* offsets, const int32_t* rows_of,
                      const float* weights, int64_t tokens, int hidden, uint16_t* out,
                      cudaStream_t stream) {
  if (tokens == 0) return;
  unpermute_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(
      reinterpret_cast<const uint4*>(rows), offsets, rows_of, weights, tokens,
      hidden / kBf16PerVector, reinterpret_cast<uint4*>(out));
  MOECOMM_LAUNCH_CHECK("unpermute_kernel");
}

}  // namespace epb
