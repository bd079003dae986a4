// bf16 and fp8 on the device, with exactly the rounding of testing/reference/numerics.hpp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

namespace moecomm::device {

inline constexpr float kFp8Max = 448.0f;
inline constexpr float kFp8AmaxFloor = 1e-4f;

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}

/// Unpacks a 16-byte vector of 8 bf16 into floats.
__device__ __forceinline__ void unpack_bf16x8(const int4& v, float (&f)[8]) {
  const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                         static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ uint32_t float_to_bf16_bits(float f) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
}

/// Packs 8 floats into 8 bf16 (round to nearest even).
__device__ __forceinline__ int4 pack_bf16x8(const float (&f)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = float_to_bf16_bits(f[2 * i]) | (float_to_bf16_bits(f[2 * i + 1]) << 16);
  return make_int4(static_cast<int>(w[0]), static_cast<int>(w[1]), static_cast<int>(w[2]),
                   static_cast<int>(w[3]));
}

/// Scale and inverse for one 128-channel group (see ref::fp8_scale).
__device__ __forceinline__ void fp8_scale(float amax, bool pow2, float& scale, float& inv) {
  const float a = fmaxf(amax, kFp8AmaxFloor);
  if (!pow2) {
    scale = __fdiv_rn(a, kFp8Max);
    inv = __fdiv_rn(kFp8Max, a);
    return;
  }
  uint32_t bits = __float_as_uint(__fdiv_rn(a, kFp8Max));
  if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;  // round up to a power of two
  scale = __uint_as_float(bits);
  inv = __fdiv_rn(1.0f, scale);
}

/// Quantises 8 values with `inv` into 8 e4m3 bytes (SATFINITE, round to nearest even), two per
/// conversion (value 2i in the low byte of pair i).
__device__ __forceinline__ uint2 quantize_fp8x8(const float (&f)[8], float inv) {
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = make_float2(__fmul_rn(f[2 * i], inv), __fmul_rn(f[2 * i + 1], inv));
    const uint32_t q = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
    w[i / 2] |= q << (16 * (i % 2));
  }
  return make_uint2(w[0], w[1]);
}

/// |max| over 8 floats.
__device__ __forceinline__ float abs_max8(const float (&f)[8]) {
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) m = fmaxf(m, fabsf(f[i]));
  return m;
}

}  // namespace moecomm::device
