#include "timing.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "bench_common.hpp"
#include "kernels.hpp"

namespace epb {
namespace {

constexpr uint64_t kGateTimeoutNs = 5'000'000'000ULL;  // no host enqueue takes this long
constexpr size_t kCopyBytes = size_t{2} << 30;         // 2 GiB, far beyond any L2
constexpr size_t kMinCopyBytes = size_t{256} << 20;
constexpr int kCopyWarmup = 2;
constexpr int kCopyIters = 10;

double percentile(const std::vector<double>& sorted, double q) {
  const double at = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(at)), hi = static_cast<size_t>(std::ceil(at));
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (at - static_cast<double>(lo));
}

/// A kernel that spins on a host-mapped flag: while it runs, nothing behind it on its stream
/// (and on the streams forked from there) starts.
class LaunchGate {
 public:
  LaunchGate() {
    EPB_CUDA(cudaHostAlloc(reinterpret_cast<void**>(&host_), 2 * sizeof(int), cudaHostAllocMapped));
    EPB_CUDA(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0));
  }
  ~LaunchGate() { cudaFreeHost(host_); }
  LaunchGate(const LaunchGate&) = delete;
  LaunchGate& operator=(const LaunchGate&) = delete;

  void close(cudaStream_t stream) {
    host_[kOpen] = 0;
    host_[kTimedOut] = 0;
    launch_gate(device_ + kOpen, device_ + kTimedOut, kGateTimeoutNs, stream);
  }
  void open() { static_cast<volatile int*>(host_)[kOpen] = 1; }
  bool timed_out() const { return static_cast<volatile int*>(host_)[kTimedOut] != 0; }

 private:
  static constexpr int kOpen = 0, kTimedOut = 1;
  int* host_ = nullptr;
  int* device_ = nullptr;
};

/// Opens the gate when the iteration's enqueueing ends, also on an exception.
class GateScope {
 public:
  GateScope(LaunchGate* gate, cudaStream_t stream) : gate_(gate) {
    if (gate_) gate_->close(stream);
  }
  ~GateScope() {
    if (gate_) gate_->open();
  }

 private:
  LaunchGate* gate_;
};

/// The events of one iteration: a start per phase, an end per (phase, rank), and join events.
class PhaseEvents {
 public:
  PhaseEvents(std::vector<cudaStream_t> streams, size_t phases)
      : streams_(std::move(streams)),
        start_(phases),
        end_(phases * streams_.size()),
        join_(streams_.size()) {
    for (auto& e : start_) EPB_CUDA(cudaEventCreate(&e));
    for (auto& e : end_) EPB_CUDA(cudaEventCreate(&e));
    for (auto& e : join_) EPB_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  ~PhaseEvents() {
    for (auto* set : {&start_, &end_, &join_})
      for (cudaEvent_t e : *set) cudaEventDestroy(e);
  }
  PhaseEvents(const PhaseEvents&) = delete;
  PhaseEvents& operator=(const PhaseEvents&) = delete;

  /// The common fork: stream 0 joins every stream, records the start, every stream waits on it.
  void begin(size_t phase) {
    for (size_t r = 1; r < streams_.size(); ++r) {
      EPB_CUDA(cudaEventRecord(join_[r], streams_[r]));
      EPB_CUDA(cudaStreamWaitEvent(streams_[0], join_[r], 0));
    }
    EPB_CUDA(cudaEventRecord(start_[phase], streams_[0]));
    for (size_t r = 1; r < streams_.size(); ++r)
      EPB_CUDA(cudaStreamWaitEvent(streams_[r], start_[phase], 0));
  }
  void end(size_t phase) {
    for (size_t r = 0; r < streams_.size(); ++r)
      EPB_CUDA(cudaEventRecord(end_[phase * streams_.size() + r], streams_[r]));
  }
  /// Max over ranks of end - start (µs), from phase `first`'s start to phase `last`'s ends.
  double elapsed_us(size_t first, size_t last) const {
    float worst = 0.0f;
    for (size_t r = 0; r < streams_.size(); ++r) {
      float ms = 0.0f;
      EPB_CUDA(cudaEventElapsedTime(&ms, start_[first], end_[last * streams_.size() + r]));
      worst = std::max(worst, ms);
    }
    return 1000.0 * worst;
  }

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> start_, end_, join_;
};

}  // namespace

Stats summarize(std::vector<double> us) {
  Stats s;
  s.samples = static_cast<int>(us.size());
  if (us.empty()) return s;
  std::sort(us.begin(), us.end());
  s.median = percentile(us, 0.5);
  s.p10 = percentile(us, 0.1);
  s.p90 = percentile(us, 0.9);
  s.min = us.front();
  s.max = us.back();
  s.mean = std::accumulate(us.begin(), us.end(), 0.0) / static_cast<double>(us.size());
  return s;
}

PhaseTimes time_phases(const std::vector<cudaStream_t>& streams, const TimingPlan& plan,
                       const std::vector<Phase>& phases, const std::function<void()>& sync) {
  PhaseEvents events(streams, phases.size());
  LaunchGate gate;
  std::vector<std::vector<double>> samples(phases.size() + 1);
  for (int it = 0; it < plan.warmup + plan.iters; ++it) {
    {
      GateScope scope(plan.gated ? &gate : nullptr, streams[0]);
      for (size_t p = 0; p < phases.size(); ++p) {
        events.begin(p);
        phases[p]();
        events.end(p);
      }
    }
    sync();
    if (plan.gated && gate.timed_out())
      throw std::runtime_error(
          "the launch gate timed out: a call blocked the host while the streams were held, so "
          "this timing is not valid");
    if (it < plan.warmup) continue;
    for (size_t p = 0; p < phases.size(); ++p) samples[p].push_back(events.elapsed_us(p, p));
    samples.back().push_back(events.elapsed_us(0, phases.size() - 1));
  }
  PhaseTimes out;
  for (size_t p = 0; p < phases.size(); ++p) out.phase.push_back(summarize(samples[p]));
  out.total = summarize(samples.back());
  return out;
}

double measure_copy_rate(int device) {
  EPB_CUDA(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  EPB_CUDA(cudaMemGetInfo(&free_bytes, &total_bytes));
  const size_t bytes = std::max(kMinCopyBytes, std::min(kCopyBytes, free_bytes / 4));
  DeviceBuffer<uint8_t> src(bytes), dst(bytes);
  EPB_CUDA(cudaMemset(src.get(), 1, bytes));
  cudaStream_t stream;
  cudaEvent_t start, stop;
  EPB_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  EPB_CUDA(cudaEventCreate(&start));
  EPB_CUDA(cudaEventCreate(&stop));
  std::vector<double> seconds;
  for (int i = 0; i < kCopyWarmup + kCopyIters; ++i) {
    EPB_CUDA(cudaEventRecord(start, stream));
    EPB_CUDA(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream));
    EPB_CUDA(cudaEventRecord(stop, stream));
    EPB_CUDA(cudaEventSynchronize(stop));
    float ms = 0.0f;
    EPB_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (i >= kCopyWarmup) seconds.push_back(1e-3 * ms);
  }
  EPB_CUDA(cudaEventDestroy(start));
  EPB_CUDA(cudaEventDestroy(stop));
  EPB_CUDA(cudaStreamDestroy(stream));
  const double median = summarize(seconds).median;  // seconds here, not µs
  return 2.0 * static_cast<double>(bytes) / median;
}

}  // namespace epb
