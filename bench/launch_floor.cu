// launch_floor: what plain launches on R streams of one GPU cost before any work is done, and the
// same kernels as one CUDA graph. Every rank of a virtual group issues its kernels on its own
// stream, so this is the floor under every plain-launch figure of ep_bench (docs/bench.md).
// Usage: launch_floor [--device D]. Prints the median span (release to the last end) per row.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int kWarmup = 5;
constexpr int kIters = 50;
constexpr int kBlocks = 16;    // ep_bench's default SMs per rank
constexpr int kThreads = 512;  // and threads per block
constexpr unsigned kGateSleepNs = 200;

#define CHECK(call)                                                                           \
  do {                                                                                        \
    const cudaError_t err_ = (call);                                                          \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "launch_floor: %s failed: %s\n", #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

__global__ void gate_kernel(const volatile int* open) {
  while (*open == 0) __nanosleep(kGateSleepNs);
}

__global__ void empty_kernel() {}

struct Gate {
  int* host = nullptr;
  int* device = nullptr;
  Gate() {
    CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int), cudaHostAllocMapped));
    CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device), host, 0));
  }
  ~Gate() { cudaFreeHost(host); }
  void close() { *static_cast<volatile int*>(host) = 0; }
  void open() { *static_cast<volatile int*>(host) = 1; }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Plain launches: a gate, a start event, `kernels` empty kernels and an end event per stream.
double plain_span_us(Gate& gate, const std::vector<cudaStream_t>& streams, int kernels) {
  const size_t R = streams.size();
  std::vector<cudaEvent_t> start(R), end(R);
  for (size_t r = 0; r < R; ++r) {
    CHECK(cudaEventCreate(&start[r]));
    CHECK(cudaEventCreate(&end[r]));
  }
  std::vector<double> spans;
  for (int it = 0; it < kWarmup + kIters; ++it) {
    gate.close();
    for (size_t r = 0; r < R; ++r) {
      gate_kernel<<<1, 1, 0, streams[r]>>>(gate.device);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(start[r], streams[r]));
      for (int k = 0; k < kernels; ++k) {
        empty_kernel<<<kBlocks, kThreads, 0, streams[r]>>>();
        CHECK(cudaGetLastError());
      }
      CHECK(cudaEventRecord(end[r], streams[r]));
    }
    gate.open();
    CHECK(cudaDeviceSynchronize());
    float first = 0.0f, last = 0.0f;
    for (size_t r = 0; r < R; ++r) {
      float s = 0.0f, e = 0.0f;
      CHECK(cudaEventElapsedTime(&s, start[0], start[r]));
      CHECK(cudaEventElapsedTime(&e, start[0], end[r]));
      first = std::min(first, s);
      last = std::max(last, e);
    }
    if (it >= kWarmup) spans.push_back(1000.0 * (last - first));
  }
  for (size_t r = 0; r < R; ++r) {
    cudaEventDestroy(start[r]);
    cudaEventDestroy(end[r]);
  }
  return median(spans);
}

/// One graph: every stream forked from stream 0, `kernels` empty kernels per branch, joined back.
double graph_span_us(Gate& gate, const std::vector<cudaStream_t>& streams, int kernels) {
  const size_t R = streams.size();
  std::vector<cudaEvent_t> edge(R);
  for (auto& e : edge) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CHECK(cudaStreamBeginCapture(streams[0], cudaStreamCaptureModeThreadLocal));
  CHECK(cudaEventRecord(edge[0], streams[0]));
  for (size_t r = 1; r < R; ++r) CHECK(cudaStreamWaitEvent(streams[r], edge[0], 0));
  for (size_t r = 0; r < R; ++r)
    for (int k = 0; k < kernels; ++k) empty_kernel<<<kBlocks, kThreads, 0, streams[r]>>>();
  for (size_t r = 1; r < R; ++r) {
    CHECK(cudaEventRecord(edge[r], streams[r]));
    CHECK(cudaStreamWaitEvent(streams[0], edge[r], 0));
  }
  CHECK(cudaStreamEndCapture(streams[0], &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t start, end;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&end));
  std::vector<double> spans;
  for (int it = 0; it < kWarmup + kIters; ++it) {
    gate.close();
    gate_kernel<<<1, 1, 0, streams[0]>>>(gate.device);
    CHECK(cudaGetLastError());
    CHECK(cudaEventRecord(start, streams[0]));
    CHECK(cudaGraphLaunch(exec, streams[0]));
    CHECK(cudaEventRecord(end, streams[0]));
    gate.open();
    CHECK(cudaDeviceSynchronize());
    float ms = 0.0f;
    CHECK(cudaEventElapsedTime(&ms, start, end));
    if (it >= kWarmup) spans.push_back(1000.0 * ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(end);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  for (auto& e : edge) cudaEventDestroy(e);
  return median(spans);
}

}  // namespace

int main(int argc, char** argv) {
  int device = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
      device = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: launch_floor [--device D]\n");
      return 2;
    }
  }
  CHECK(cudaSetDevice(device));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, device));
  std::printf("launch_floor on %s: empty kernels of %d x %d threads, median of %d, us\n", prop.name,
              kBlocks, kThreads, kIters);
  std::printf("%7s %17s %12s %12s\n", "streams", "kernels/stream", "plain", "one graph");
  Gate gate;
  for (int R : {1, 2, 4, 8}) {
    std::vector<cudaStream_t> streams(R);
    for (auto& s : streams) CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    for (int k : {1, 2, 4})
      std::printf("%7d %17d %12.1f %12.1f\n", R, k, plain_span_us(gate, streams, k),
                  graph_span_us(gate, streams, k));
    for (auto& s : streams) cudaStreamDestroy(s);
  }
  return 0;
}
