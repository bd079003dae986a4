// The device conversions and the fp8 scale rule equal the host reference bit for bit.
#include <random>

#include "device/numerics.cuh"
#include "gpu/gpu_common.hpp"
#include "reference/numerics.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

__global__ void convert_kernel(const float* in, int n, uint16_t* bf16, uint8_t* fp8) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  bf16[i] = static_cast<uint16_t>(device::float_to_bf16_bits(in[i]));
  fp8[i] = __nv_cvt_float_to_fp8(in[i], __NV_SATFINITE, __NV_E4M3);
}

__global__ void scale_kernel(const float* amax, int n, bool pow2, float* scale, float* inv) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) device::fp8_scale(amax[i], pow2, scale[i], inv[i]);
}

}  // namespace

TEST_CASE("device bf16 and fp8 conversions equal the reference") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());
  std::vector<float> v;
  // Every fp8 code's value and the midpoints between neighbours, plus random floats of all scales.
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    v.push_back(ref::fp8_to_float(static_cast<uint8_t>(c)));
    if ((c & 0x7f) < 0x7e) v.push_back(0.5f * (ref::fp8_to_float(c) + ref::fp8_to_float(c + 1)));
  }
  std::uniform_real_distribution<float> mant(-1.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-20, 12);
  for (int i = 0; i < 100000; ++i) v.push_back(std::ldexp(mant(rng), ex(rng)));
  for (float big : {448.0f, 460.0f, 464.0f, 500.0f, 1e30f, -1e30f}) v.push_back(big);
  const int n = static_cast<int>(v.size());
  DeviceBuffer<float> d_in(v);
  DeviceBuffer<uint16_t> d_bf16(n);
  DeviceBuffer<uint8_t> d_fp8(n);
  d_bf16.poison();
  d_fp8.poison();
  convert_kernel<<<(n + 255) / 256, 256>>>(d_in.get(), n, d_bf16.get(), d_fp8.get());
  MOECOMM_CUDA_CHECK(cudaGetLastError());
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  const auto bf16 = d_bf16.download();
  const auto fp8 = d_fp8.download();
  int bad_bf16 = 0, bad_fp8 = 0;
  for (int i = 0; i < n; ++i) {
    bad_bf16 += bf16[i] != ref::float_to_bf16(v[i]);
    bad_fp8 += fp8[i] != ref::float_to_fp8(v[i]);
  }
  CHECK_EQ(bad_bf16, 0);
  CHECK_EQ(bad_fp8, 0);
}

TEST_CASE("device fp8 scales equal the reference for both formats") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 1);
  std::vector<float> amax = {0.0f, 1e-6f, 1e-4f, 1.0f, 448.0f, 3.5f, 1e4f};
  std::uniform_real_distribution<float> u(0.0f, 30.0f);
  for (int i = 0; i < 10000; ++i) amax.push_back(u(rng));
  const int n = static_cast<int>(amax.size());
  DeviceBuffer<float> d_amax(amax), d_scale(n), d_inv(n);
  for (bool pow2 : {false, true}) {
    d_scale.poison();
    d_inv.poison();
    scale_kernel<<<(n + 255) / 256, 256>>>(d_amax.get(), n, pow2, d_scale.get(), d_inv.get());
    MOECOMM_CUDA_CHECK(cudaGetLastError());
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
    const auto s = d_scale.download(), inv = d_inv.download();
    int bad = 0;
    for (int i = 0; i < n; ++i) {
      float ws, wi;
      ref::fp8_scale(amax[i], pow2 ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32, &ws, &wi);
      bad += std::memcmp(&ws, &s[i], 4) != 0 || std::memcmp(&wi, &inv[i], 4) != 0;
    }
    CHECK_EQ(bad, 0) << (pow2 ? "pow2" : "f32");
  }
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
