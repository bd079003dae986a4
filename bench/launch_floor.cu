// launch_floor: what plain launches on R streams of one GPU cost before any work is done, and the
// same kernels as one CUDA graph. Every rank of a virtual group issues its kernels on its own
// stream, so this is the floor under every plain-launch figure of ep_bench (docs/bench.md). It
// times with ep_bench's own method (timing.hpp): gated release, earliest start to latest end.
// Usage: launch_floor [--device D]. Prints the median span per row, in microseconds.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <exception>
#include <vector>

#include "bench_common.hpp"
#include "timing.hpp"

namespace {

constexpr int kWarmup = 5;
constexpr int kIters = 50;
constexpr int kBlocks = 16;    // ep_bench's default SMs per rank
constexpr int kThreads = 512;  // and threads per block

__global__ void empty_kernel() {}

/// `kernels` empty kernels on every stream.
epb::Phase empty_kernels(const std::vector<cudaStream_t>& streams, int kernels) {
  return [&streams, kernels] {
    for (cudaStream_t s : streams)
      for (int k = 0; k < kernels; ++k) {
        empty_kernel<<<kBlocks, kThreads, 0, s>>>();
        MOECOMM_LAUNCH_CHECK("empty_kernel");
      }
  };
}

}  // namespace

int main(int argc, char** argv) try {
  const int device = epb::parse_device_option(argc, argv, "launch_floor");
  if (device < 0) return 2;
  MOECOMM_CUDA_CHECK(cudaSetDevice(device));
  // Load the kernel now: a lazy load at its first launch would wait for the device to go idle,
  // which the spinning gate kernel prevents.
  cudaFuncAttributes attr;
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, empty_kernel));
  cudaDeviceProp prop;
  MOECOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("launch_floor on %s: empty kernels of %d x %d threads, median of %d, us\n", prop.name,
              kBlocks, kThreads, kIters);
  std::printf("%7s %17s %12s %12s\n", "streams", "kernels/stream", "plain", "one graph");
  const epb::TimingPlan plan{kWarmup, kIters, /*gated=*/true, {}};
  for (int R : {1, 2, 4, 8}) {
    std::vector<cudaStream_t> streams(R);
    for (auto& s : streams)
      MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const auto sync = [&streams] {
      for (cudaStream_t s : streams) MOECOMM_CUDA_CHECK(cudaStreamSynchronize(s));
    };
    for (int k : {1, 2, 4}) {
      const epb::Phase phase = empty_kernels(streams, k);
      const double plain = epb::time_phases(streams, plan, {phase}, sync).phase[0].median;
      const double graph = epb::GroupGraph(streams, phase).time(plan, sync).phase[0].median;
      std::printf("%7d %17d %12.1f %12.1f\n", R, k, plain, graph);
    }
    for (cudaStream_t s : streams) cudaStreamDestroy(s);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "launch_floor: %s\n", e.what());
  return 1;
}
