// Host tests of the reference number formats: bf16 and fp8 e4m3 rounding, fp8 scales and
// per-group quantisation.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "common/harness.hpp"
#include "common/random.hpp"
#include "reference/numerics.hpp"

using namespace moecomm;
using namespace moecomm::ref;

namespace {

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

int code(fp8_t v) {
  return static_cast<int>(v);
}  // printable

/// Independent e4m3 oracle: nearest finite value by exact double distance, ties to the even
/// code, anything beyond 448 saturates (SATFINITE).
fp8_t brute_force_fp8(float v) {
  if (std::isnan(v)) return 0x7f;
  const double a = std::fabs(static_cast<double>(v));
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  int best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= 0x7e; ++c) {
    const int exp = c >> 3, man = c & 7;
    const double val = exp == 0 ? std::ldexp(man, -9) : std::ldexp(8 + man, exp - 10);
    const double d = std::fabs(val - a);
    if (d < best_d || (d == best_d && (c & 1) == 0)) {
      best = c;
      best_d = d;
    }
  }
  return static_cast<fp8_t>(sign | best);
}

}  // namespace

TEST_CASE("bf16 rounds to nearest even") {
  CHECK_EQ(float_to_bf16(1.0f), 0x3f80);
  CHECK_EQ(float_to_bf16(-2.0f), 0xc000);
  CHECK_EQ(float_to_bf16(0.0f), 0x0000);
  CHECK_EQ(float_to_bf16(-0.0f), 0x8000);
  // 1 + 2^-8 lies halfway between 0x3f80 and 0x3f81: ties to the even 0x3f80.
  CHECK_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 0x3f81 and 0x3f82: ties to the even 0x3f82.
  CHECK_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  // Just above / below a tie.
  CHECK_EQ(float_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
  CHECK_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f - 0x1p-20f), 0x3f81);
  CHECK_EQ(float_to_bf16(-(1.0f + 0x1p-8f + 0x1p-20f)), 0xbf81);
  // A carry from the mantissa into the exponent: 2 - 2^-9 rounds up to 2.
  CHECK_EQ(float_to_bf16(2.0f - 0x1p-9f), 0x4000);
  // Denormals round too.
  CHECK_EQ(float_to_bf16(from_bits(0x00018000)), 0x0002);
  CHECK_EQ(float_to_bf16(from_bits(0x00008000)), 0x0000);
}

TEST_CASE("bf16 inf, overflow and NaN") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_EQ(float_to_bf16(inf), 0x7f80);
  CHECK_EQ(float_to_bf16(-inf), 0xff80);
  // The largest float is beyond the largest bf16 plus half an ulp: rounds to infinity.
  CHECK_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  CHECK_EQ(float_to_bf16(-std::numeric_limits<float>::max()), 0xff80);
  // NaNs become the canonical quiet NaN, including a signalling NaN whose payload lies only in
  // the dropped bits (naive rounding would make it infinity).
  CHECK_EQ(float_to_bf16(std::nanf("")), 0x7fff);
  CHECK_EQ(float_to_bf16(from_bits(0x7f800001)), 0x7fff);
  CHECK_EQ(float_to_bf16(from_bits(0xffc00000)), 0x7fff);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(std::nanf("")))));
}

TEST_CASE("bf16 round trip of every code") {
  int bad = 0;
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_float(static_cast<bf16_t>(b));
    CHECK_EQ(to_bits(f), b << 16);
    if (std::isnan(f)) continue;
    if (float_to_bf16(f) != b) ++bad;
  }
  CHECK_EQ(bad, 0);
}

TEST_CASE("fp8 known encodings") {
  const float inf = std::numeric_limits<float>::infinity();
  CHECK_EQ(code(float_to_fp8(0.0f)), 0x00);
  CHECK_EQ(code(float_to_fp8(-0.0f)), 0x80);
  CHECK_EQ(code(float_to_fp8(1.0f)), 0x38);
  CHECK_EQ(code(float_to_fp8(-1.0f)), 0xb8);
  CHECK_EQ(code(float_to_fp8(448.0f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(-448.0f)), 0xfe);
  CHECK_EQ(code(float_to_fp8(0x1p-9f)), 0x01);         // smallest subnormal
  CHECK_EQ(code(float_to_fp8(0x1p-6f)), 0x08);         // smallest normal
  CHECK_EQ(code(float_to_fp8(7 * 0x1p-9f)), 0x07);     // largest subnormal
  CHECK_EQ(code(float_to_fp8(0.5f * 0x1p-9f)), 0x00);  // tie between 0 and 0x01 -> even 0
  CHECK_EQ(code(float_to_fp8(-0.5f * 0x1p-9f)), 0x80);
  CHECK_EQ(code(float_to_fp8(0.5f * 0x1p-9f + 0x1p-30f)), 0x01);  // just above the tie
  CHECK_EQ(code(float_to_fp8(1.5f * 0x1p-9f)), 0x02);  // tie between 0x01 and 0x02 -> 0x02
  CHECK_EQ(code(float_to_fp8(2.5f * 0x1p-9f)), 0x02);  // tie between 0x02 and 0x03 -> 0x02
  CHECK_EQ(code(float_to_fp8(7.5f * 0x1p-9f)), 0x08);  // tie into the first normal binade
  CHECK_EQ(code(float_to_fp8(1e-30f)), 0x00);
  CHECK_EQ(code(float_to_fp8(from_bits(0x00000001))), 0x00);  // float denormal
  CHECK_EQ(code(float_to_fp8(-from_bits(0x00000001))), 0x80);
  // Near the top: 448 = 0x7e; 464 is the tie with the (non-existent) 480 -> 448; beyond
  // saturates.
  CHECK_EQ(code(float_to_fp8(449.0f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(463.99f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(464.0f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(-464.0f)), 0xfe);
  CHECK_EQ(code(float_to_fp8(std::nextafter(464.0f, inf))), 0x7e);
  CHECK_EQ(code(float_to_fp8(480.0f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(1e9f)), 0x7e);
  CHECK_EQ(code(float_to_fp8(-1e9f)), 0xfe);
  CHECK_EQ(code(float_to_fp8(std::numeric_limits<float>::max())), 0x7e);
  CHECK_EQ(code(float_to_fp8(inf)), 0x7e);
  CHECK_EQ(code(float_to_fp8(-inf)), 0xfe);
  // 416 (0x7d) and 448 (0x7e): the tie 432 goes to the even code 0x7e.
  CHECK_EQ(code(float_to_fp8(432.0f)), 0x7e);
  // 240 is 0x77 (e = 7, m = 7), 256 is 0x78: tie 248 -> 0x78.
  CHECK_EQ(code(float_to_fp8(240.0f)), 0x77);
  CHECK_EQ(code(float_to_fp8(248.0f)), 0x78);
  CHECK_EQ(code(float_to_fp8(std::nanf(""))), 0x7f);
  CHECK_EQ(code(float_to_fp8(-std::nanf(""))), 0x7f);
  CHECK_EQ(code(float_to_fp8(from_bits(0x7f800001))), 0x7f);
}

TEST_CASE("fp8 decode") {
  CHECK_EQ(fp8_to_float(0x00), 0.0f);
  CHECK(std::signbit(fp8_to_float(0x80)));
  CHECK_EQ(fp8_to_float(0x38), 1.0f);
  CHECK_EQ(fp8_to_float(0x7e), 448.0f);
  CHECK_EQ(fp8_to_float(0xfe), -448.0f);
  CHECK_EQ(fp8_to_float(0x01), 0x1p-9f);
  CHECK_EQ(fp8_to_float(0x07), 7 * 0x1p-9f);
  CHECK_EQ(fp8_to_float(0x08), 0x1p-6f);
  CHECK_EQ(fp8_to_float(0x3c), 1.5f);
  CHECK(std::isnan(fp8_to_float(0x7f)));
  CHECK(std::isnan(fp8_to_float(0xff)));
  // 0x78..0x7e are finite: e4m3fn has no infinity.
  CHECK_EQ(fp8_to_float(0x78), 256.0f);
}

TEST_CASE("fp8 round trip of every code") {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;  // NaN
    const float f = fp8_to_float(static_cast<fp8_t>(c));
    CHECK_EQ(code(float_to_fp8(f)), c) << " value " << f;
  }
}

TEST_CASE("fp8 ties and neighbours go to the even code") {
  const float inf = std::numeric_limits<float>::infinity();
  for (int c = 0; c < 0x7e; ++c) {
    for (int sign = 0; sign < 2; ++sign) {
      const float s = sign ? -1.0f : 1.0f;
      const uint8_t sb = sign ? 0x80 : 0x00;
      const float lo = fp8_to_float(static_cast<fp8_t>(c));
      const float hi = fp8_to_float(static_cast<fp8_t>(c + 1));
      const float mid = 0.5f * (lo + hi);  // exact: at most 5 significant bits
      const int even = (c % 2 == 0) ? c : c + 1;
      CHECK_EQ(code(float_to_fp8(s * mid)), sb | even) << " between codes " << c << ", " << c + 1;
      CHECK_EQ(code(float_to_fp8(s * std::nextafter(mid, inf))), sb | (c + 1)) << " code " << c;
      CHECK_EQ(code(float_to_fp8(s * std::nextafter(mid, 0.0f))), sb | c) << " code " << c;
    }
  }
}

TEST_CASE("fp8 matches a brute-force nearest-value oracle") {
  std::mt19937_64 rng(test::seed());
  std::uniform_real_distribution<double> log2mag(-14.0, 10.0);
  std::uniform_int_distribution<uint32_t> any_bits;
  int bad = 0;
  for (int i = 0; i < 200000; ++i) {
    float v = static_cast<float>(std::exp2(log2mag(rng)));
    if (i % 2) v = -v;
    if (i % 7 == 0) v = from_bits(any_bits(rng));  // anything, NaN and inf included
    if (float_to_fp8(v) != brute_force_fp8(v)) {
      if (++bad <= 5) CHECK_EQ(code(float_to_fp8(v)), code(brute_force_fp8(v))) << " v = " << v;
    }
  }
  CHECK_EQ(bad, 0);
}

TEST_CASE("fp8_scale float32") {
  float scale, inv;
  fp8_scale(448.0f, ScaleFormat::kFloat32, &scale, &inv);
  CHECK_EQ(scale, 1.0f);
  CHECK_EQ(inv, 1.0f);
  fp8_scale(1.0f, ScaleFormat::kFloat32, &scale, &inv);
  CHECK_EQ(scale, 1.0f / 448.0f);
  CHECK_EQ(inv, 448.0f);
  fp8_scale(3.0f, ScaleFormat::kFloat32, &scale, &inv);
  CHECK_EQ(scale, 3.0f / 448.0f);
  CHECK_EQ(inv, 448.0f / 3.0f);  // not 1 / scale
  // amax 0 (an all-zero group) is clamped to the floor.
  fp8_scale(0.0f, ScaleFormat::kFloat32, &scale, &inv);
  CHECK_EQ(scale, kFp8AmaxFloor / 448.0f);
  CHECK_EQ(inv, 448.0f / kFp8AmaxFloor);
  fp8_scale(0.5e-4f, ScaleFormat::kFloat32, &scale, &inv);
  CHECK_EQ(scale, kFp8AmaxFloor / 448.0f);
}

TEST_CASE("fp8_scale power of two") {
  float scale, inv;
  struct Case {
    float amax, scale, inv;
  };
  const Case cases[] = {
      {448.0f, 1.0f, 1.0f},       // exactly 1: stays
      {449.0f, 2.0f, 0.5f},       // just above 1: next power
      {896.0f, 2.0f, 0.5f},       // exactly 2
      {1344.0f, 4.0f, 0.25f},     // 3 -> 4
      {224.0f, 0.5f, 2.0f},       // exactly 1/2
      {1.0f, 0x1p-8f, 256.0f},    // 1/448 = 0.00223 -> 2^-8
      {0.0f, 0x1p-22f, 0x1p22f},  // floor: 1e-4 / 448 = 2.23e-7 -> 2^-22
      {3.5f, 0x1p-7f, 128.0f},    // 3.5 / 448 = 2^-7 exactly
      {3.5001f, 0x1p-6f, 64.0f},  // just above
  };
  for (const Case& c : cases) {
    fp8_scale(c.amax, ScaleFormat::kPowerOfTwo, &scale, &inv);
    CHECK_EQ(scale, c.scale) << " amax " << c.amax;
    CHECK_EQ(inv, c.inv) << " amax " << c.amax;
  }
  // Property: a power of two, >= a / 448 and < 2 * a / 448.
  std::mt19937_64 rng(test::seed());
  std::uniform_real_distribution<double> log2mag(-20.0, 20.0);
  for (int i = 0; i < 10000; ++i) {
    const float amax = static_cast<float>(std::exp2(log2mag(rng)));
    fp8_scale(amax, ScaleFormat::kPowerOfTwo, &scale, &inv);
    const float f = std::fmax(amax, kFp8AmaxFloor) / 448.0f;
    CHECK((to_bits(scale) & 0x7fffff) == 0) << " amax " << amax;
    CHECK(scale >= f && scale < 2 * f) << " amax " << amax;
    CHECK_EQ(scale * inv, 1.0f);
  }
}

TEST_CASE("quantize_fp8 hand-made group") {
  // One row of two groups: group 0 holds 2, -1, 0.5 and zeros; group 1 is all zeros.
  std::vector<bf16_t> x(256, 0);
  x[0] = float_to_bf16(2.0f);
  x[1] = float_to_bf16(-1.0f);
  x[2] = float_to_bf16(0.5f);
  std::vector<fp8_t> q(256, 0xaa);
  std::vector<float> scales(2, -1.0f);

  // Float32: scale = 2 / 448, inv = 224: 448 -> 0x7e, -224 -> 0xf6, 112 -> 0x6e.
  quantize_fp8(x.data(), 1, 256, ScaleFormat::kFloat32, q.data(), scales.data());
  CHECK_EQ(scales[0], 2.0f / 448.0f);
  CHECK_EQ(scales[1], kFp8AmaxFloor / 448.0f);
  CHECK_EQ(code(q[0]), 0x7e);
  CHECK_EQ(code(q[1]), 0xf6);
  CHECK_EQ(code(q[2]), 0x6e);
  for (int c = 3; c < 256; ++c) CHECK_EQ(code(q[c]), 0x00) << " channel " << c;

  // Power of two: 2 / 448 -> 2^-7, inv = 128: 256 -> 0x78, -128 -> 0xf0, 64 -> 0x68.
  quantize_fp8(x.data(), 1, 256, ScaleFormat::kPowerOfTwo, q.data(), scales.data());
  CHECK_EQ(scales[0], 0x1p-7f);
  CHECK_EQ(scales[1], 0x1p-22f);
  CHECK_EQ(code(q[0]), 0x78);
  CHECK_EQ(code(q[1]), 0xf0);
  CHECK_EQ(code(q[2]), 0x68);
  for (int c = 3; c < 256; ++c) CHECK_EQ(code(q[c]), 0x00) << " channel " << c;
}

TEST_CASE("quantize_fp8 random rows") {
  std::mt19937_64 rng(test::seed());
  const int rows = 7, hidden = 384, groups = hidden / 128;
  const std::vector<bf16_t> x = test::random_bf16(rng, static_cast<size_t>(rows) * hidden);
  std::vector<fp8_t> q(x.size());
  std::vector<float> scales(rows * groups);
  for (ScaleFormat f : {ScaleFormat::kFloat32, ScaleFormat::kPowerOfTwo}) {
    quantize_fp8(x.data(), rows, hidden, f, q.data(), scales.data());
    for (int r = 0; r < rows; ++r) {
      for (int g = 0; g < groups; ++g) {
        float amax = 0.0f;
        for (int c = 0; c < 128; ++c)
          amax = std::fmax(amax, std::fabs(bf16_to_float(x[r * hidden + g * 128 + c])));
        float scale, inv;
        fp8_scale(amax, f, &scale, &inv);
        CHECK_EQ(scales[r * groups + g], scale);
        for (int c = 0; c < 128; ++c) {
          const size_t i = static_cast<size_t>(r) * hidden + g * 128 + c;
          const float xv = bf16_to_float(x[i]);
          CHECK_EQ(code(q[i]), code(float_to_fp8(xv * inv)));
          // Dequantised value within half an e4m3 ulp (relative 2^-4) or the subnormal step.
          const float back = fp8_to_float(q[i]) * scale;
          CHECK(std::fabs(back - xv) <= (std::fabs(xv) * 0x1p-4f + 0x1p-10f * scale) * 1.01f)
              << " x " << xv << " back " << back;
        }
      }
    }
  }
}

TEST_CASE("quantize_fp8 rejects bad hidden") {
  std::vector<bf16_t> x(100, 0);
  std::vector<fp8_t> q(100);
  std::vector<float> s(1);
  CHECK_THROWS(quantize_fp8(x.data(), 1, 100, ScaleFormat::kFloat32, q.data(), s.data()),
               std::invalid_argument, "hidden");
  CHECK_THROWS(quantize_fp8(x.data(), -1, 128, ScaleFormat::kFloat32, q.data(), s.data()),
               std::invalid_argument, "rows");
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
