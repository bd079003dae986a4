// Host versions of the bf16 / fp8 e4m3 conversions, bit-exact with the CUDA intrinsics
// (__float2bfloat16_rn, __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3)). All rounding is
// done on integers, never through the host's floating-point rounding mode.
#include "reference/numerics.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moecomm::ref {
namespace {

uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

/// Rounds m / 2^shift to the nearest integer, ties to even (shift >= 0).
uint64_t shift_right_rne(uint64_t m, int shift) {
  if (shift == 0) return m;
  if (shift > 63) return 0;  // m < 2^32 here, so m / 2^shift < 1/2
  const uint64_t q = m >> shift;
  const uint64_t rem = m & ((uint64_t{1} << shift) - 1);
  const uint64_t half = uint64_t{1} << (shift - 1);
  return (rem > half || (rem == half && (q & 1))) ? q + 1 : q;
}

}  // namespace

float bf16_to_float(bf16_t v) {
  return bits_float(static_cast<uint32_t>(v) << 16);
}

bf16_t float_to_bf16(float v) {
  const uint32_t b = float_bits(v);
  // Canonical quiet NaN, as the CUDA conversion returns (regardless of sign and payload).
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  // Round to nearest even on the 16 dropped bits; a carry correctly walks into the exponent
  // (and to infinity above the largest bf16).
  const uint32_t rounded = b + 0x7fffu + ((b >> 16) & 1u);
  return static_cast<bf16_t>(rounded >> 16);
}

float fp8_to_float(fp8_t v) {
  const int exp = (v >> 3) & 0xf;
  const int man = v & 0x7;
  const bool neg = (v & 0x80) != 0;
  if (exp == 0xf && man == 0x7) return std::nanf("");
  // Subnormal: man * 2^-9; normal: (8 + man) * 2^(exp - 10). Both exact in float.
  const float mag = exp == 0 ? std::ldexp(static_cast<float>(man), -9)
                             : std::ldexp(static_cast<float>(8 + man), exp - 10);
  return neg ? -mag : mag;
}

fp8_t float_to_fp8(float v) {
  const uint32_t b = float_bits(v);
  const uint8_t sign = static_cast<uint8_t>((b >> 24) & 0x80u);
  const uint32_t abs_bits = b & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return 0x7f;  // NaN (the sign is not kept)
  // Every finite value >= 448 rounds to 448 (up to 464 by rounding, above by SATFINITE), as does
  // infinity.
  if (bits_float(abs_bits) >= kFp8Max) return static_cast<fp8_t>(sign | 0x7e);

  // |v| = m * 2^(fexp - 150), m an integer (implicit bit included for normals).
  const int fexp_field = static_cast<int>(abs_bits >> 23);
  const uint64_t m =
      fexp_field == 0 ? (abs_bits & 0x7fffffu) : ((abs_bits & 0x7fffffu) | 0x800000u);
  if (m == 0) return sign;  // +-0
  const int fexp = fexp_field == 0 ? 1 : fexp_field;
  // e = floor(log2 |v|), clamped to the e4m3 minimum normal exponent -6 (subnormals share the
  // quantum of the lowest binade). The quantum of binade e is 2^(e-3).
  const int top_bit = 63 - __builtin_clzll(m);
  int e = fexp - 150 + top_bit;
  if (e < -6) e = -6;
  // n = round(|v| / 2^(e-3)); n in [0, 16]. Code = (e + 6) * 8 + n covers subnormals (e = -6,
  // n < 8), normals (n in [8, 16)) and the carry into the next binade (n == 16).
  const int shift = (e - 3) - (fexp - 150);  // > 0 since |v| < 448 has 24-bit precision at most
  const uint64_t n = shift_right_rne(m, shift);
  const int code = (e + 6) * 8 + static_cast<int>(n);
  return static_cast<fp8_t>(sign | code);
}

void fp8_scale(float amax, ScaleFormat format, float* scale, float* inv) {
  // fmaxf semantics: a NaN amax yields the floor, as on the device.
  const float a = std::fmax(amax, kFp8AmaxFloor);
  if (format == ScaleFormat::kFloat32) {
    *scale = a / kFp8Max;
    *inv = kFp8Max / a;
    return;
  }
  // Power of two >= a / 448: bump the exponent when any mantissa bit is set. a / 448 is a
  // normal float (>= 1e-4 / 448), so its mantissa field holds the whole fraction.
  const uint32_t f = float_bits(a / kFp8Max);
  uint32_t p = f & 0xff800000u;
  if (f & 0x007fffffu) p += 0x00800000u;
  *scale = bits_float(p);
  *inv = 1.0f / *scale;
}

void quantize_fp8(const bf16_t* x, int64_t rows, int hidden, ScaleFormat format, fp8_t* q,
                  float* scales) {
  if (rows < 0) throw std::invalid_argument("rows must be >= 0, got " + std::to_string(rows));
  if (hidden <= 0 || hidden % kFp8Group != 0)
    throw std::invalid_argument("hidden must be a positive multiple of 128, got " +
                                std::to_string(hidden));
  const int groups = hidden / kFp8Group;
  for (int64_t r = 0; r < rows; ++r) {
    for (int g = 0; g < groups; ++g) {
      const int64_t base = r * hidden + static_cast<int64_t>(g) * kFp8Group;
      float amax = 0.0f;
      for (int c = 0; c < kFp8Group; ++c)
        amax = std::fmax(amax, std::fabs(bf16_to_float(x[base + c])));
      float scale, inv;
      fp8_scale(amax, format, &scale, &inv);
      scales[r * groups + g] = scale;
      for (int c = 0; c < kFp8Group; ++c) {
        const float scaled = bf16_to_float(x[base + c]) * inv;  // one rounding: no fma involved
        q[base + c] = float_to_fp8(scaled);
      }
    }
  }
}

}  // namespace moecomm::ref
