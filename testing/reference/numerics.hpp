// Host versions of the number formats the kernels produce, with the same rounding:
// bf16 and fp8 e4m3 round to nearest, ties to even; fp8 saturates to +-448 (SATFINITE).
#pragma once

#include <cstdint>

#include "moecomm/config.hpp"
#include "runtime/limits.hpp"

namespace moecomm::ref {

using bf16_t = uint16_t;  ///< raw bfloat16 bits
using fp8_t = uint8_t;    ///< raw e4m3 bits

float bf16_to_float(bf16_t v);
/// Round to nearest even; NaN stays NaN (quiet).
bf16_t float_to_bf16(float v);

float fp8_to_float(fp8_t v);
/// As CUDA's __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3): round to nearest even,
/// |v| > 448 (and +-inf) saturates to +-448, NaN gives 0x7f.
fp8_t float_to_fp8(float v);

/// Channels that share one fp8 scale (the library's constant: the oracle must agree with it).
using detail::kFp8Group;
/// Largest finite e4m3 value.
inline constexpr float kFp8Max = 448.0f;
/// amax is clamped to at least this before forming a scale (all-zero groups).
inline constexpr float kFp8AmaxFloor = 1e-4f;

/// Scale and its inverse for one group, exactly as the kernels compute them:
///   a = max(amax, kFp8AmaxFloor)
///   kFloat32:    scale = a / 448,  inv = 448 / a
///   kPowerOfTwo: scale = the smallest power of two >= a / 448 (from the bits of a / 448),
///                inv = 1 / scale (exact)
void fp8_scale(float amax, ScaleFormat format, float* scale, float* inv);

/// Quantises rows of bf16 [rows, hidden] to e4m3 with one f32 scale per 128 channels:
/// q = float_to_fp8(x * inv) for every channel of the group. hidden % 128 == 0.
void quantize_fp8(const bf16_t* x, int64_t rows, int hidden, ScaleFormat format, fp8_t* q,
                  float* scales);

}  // namespace moecomm::ref
