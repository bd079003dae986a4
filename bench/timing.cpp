#include "timing.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <string>

#include "bench_common.hpp"
#include "kernels.hpp"
#include "runtime/streams.hpp"

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

/// Gate kernels that spin on one host-mapped flag: while closed, nothing behind them on their
/// streams starts; one host store releases every stream at once.
class LaunchGate {
 public:
  explicit LaunchGate(size_t streams) : streams_(streams) {
    MOECOMM_CUDA_CHECK(
        cudaHostAlloc(reinterpret_cast<void**>(&host_), 2 * sizeof(int), cudaHostAllocMapped));
    MOECOMM_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0));
    MOECOMM_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&released_host_),
                                     streams * sizeof(uint64_t), cudaHostAllocMapped));
    MOECOMM_CUDA_CHECK(
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&released_), released_host_, 0));
  }
  ~LaunchGate() {
    cudaFreeHost(host_);
    cudaFreeHost(released_host_);
  }
  LaunchGate(const LaunchGate&) = delete;
  LaunchGate& operator=(const LaunchGate&) = delete;

  void close(const std::vector<cudaStream_t>& streams) {
    host_[kOpen] = 0;
    host_[kTimedOut] = 0;
    for (size_t i = 0; i < streams_; ++i) released_host_[i] = 0;
    for (size_t i = 0; i < streams.size(); ++i)
      launch_gate(device_ + kOpen, device_ + kTimedOut, released_ + i, kGateTimeoutNs, streams[i]);
  }
  void open() { static_cast<volatile int*>(host_)[kOpen] = 1; }
  bool timed_out() const { return static_cast<volatile int*>(host_)[kTimedOut] != 0; }
  /// After the phase's sync: the earliest time a gate saw the release (global timer ns).
  uint64_t released_ns() const {
    uint64_t first = 0;
    for (size_t i = 0; i < streams_; ++i) {
      const uint64_t t = static_cast<volatile uint64_t*>(released_host_)[i];
      if (t && (!first || t < first)) first = t;
    }
    return first;
  }

 private:
  static constexpr int kOpen = 0, kTimedOut = 1;
  size_t streams_;
  int* host_ = nullptr;
  int* device_ = nullptr;
  uint64_t* released_host_ = nullptr;
  uint64_t* released_ = nullptr;
};

/// One iteration's split from the gate's release, every rank's trace and the phase's time;
/// nothing when a rank's call did not run after the release (its trace is an older call's).
std::optional<std::vector<double>> split_sample(uint64_t release,
                                                const std::vector<moecomm::CallTrace>& traces,
                                                double span_us) {
  if (!release || traces.empty()) return std::nullopt;
  uint64_t first = 0, last_start = 0, opened = 0, streamed = 0, closed = 0, received = 0;
  for (const moecomm::CallTrace& t : traces) {
    if (t.first_block_start < release || !t.closed) return std::nullopt;
    first = first ? std::min(first, t.first_block_start) : t.first_block_start;
    last_start = std::max(last_start, t.last_block_start);
    opened = std::max(opened, t.opened);
    streamed = std::max(streamed, t.streamed);
    closed = std::max(closed, t.closed);
    received = std::max(received, t.received);
  }
  const auto us = [](uint64_t from, uint64_t to) {
    return 1e-3 * (static_cast<double>(to) - static_cast<double>(from));
  };
  const uint64_t done = std::max(closed, received);
  return std::vector<double>{us(release, first),         us(first, last_start),
                             us(last_start, opened),     us(opened, streamed),
                             us(streamed, closed),       received ? us(closed, received) : 0.0,
                             span_us - us(release, done)};
}

PhaseSplit summarize_split(const std::vector<std::vector<double>>& samples) {
  PhaseSplit s;
  s.samples = static_cast<int>(samples.size());
  std::vector<double> column;
  auto median_of = [&](size_t i) {
    column.clear();
    for (const auto& v : samples) column.push_back(v[i]);
    return summarize(column).median;
  };
  s.launch = median_of(0);
  s.block_start = median_of(1);
  s.open = median_of(2);
  s.stream = median_of(3);
  s.close = median_of(4);
  s.receive = median_of(5);
  s.tail = median_of(6);
  return s;
}

/// Opens the gate when the phase's enqueueing ends, also on an exception.
class GateScope {
 public:
  GateScope(LaunchGate* gate, const std::vector<cudaStream_t>& streams) : gate_(gate) {
    if (gate_) gate_->close(streams);
  }
  ~GateScope() {
    if (gate_) gate_->open();
  }

 private:
  LaunchGate* gate_;
};

/// A start and an end event per stream for one phase.
class PhaseEvents {
 public:
  explicit PhaseEvents(size_t streams) : start_(streams), end_(streams) {
    for (auto* set : {&start_, &end_})
      for (auto& e : *set) MOECOMM_CUDA_CHECK(cudaEventCreate(&e));
  }
  ~PhaseEvents() {
    for (auto* set : {&start_, &end_})
      for (cudaEvent_t e : *set) cudaEventDestroy(e);
  }
  PhaseEvents(const PhaseEvents&) = delete;
  PhaseEvents& operator=(const PhaseEvents&) = delete;

  void begin(const std::vector<cudaStream_t>& streams) {
    for (size_t r = 0; r < streams.size(); ++r)
      MOECOMM_CUDA_CHECK(cudaEventRecord(start_[r], streams[r]));
  }
  void end(const std::vector<cudaStream_t>& streams) {
    for (size_t r = 0; r < streams.size(); ++r)
      MOECOMM_CUDA_CHECK(cudaEventRecord(end_[r], streams[r]));
  }
  /// From the earliest rank's start to the latest rank's end, µs (times relative to stream 0's
  /// start; a rank that started earlier gives a negative offset).
  double span_us() const {
    float first = 0.0f, last = 0.0f;
    for (size_t r = 0; r < start_.size(); ++r) {
      float s = 0.0f, e = 0.0f;
      MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&s, start_[0], start_[r]));
      MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&e, start_[0], end_[r]));
      first = std::min(first, s);
      last = std::max(last, e);
    }
    return 1000.0 * (last - first);
  }

 private:
  std::vector<cudaEvent_t> start_, end_;
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
  std::vector<std::unique_ptr<PhaseEvents>> events;
  for (size_t p = 0; p < phases.size(); ++p)
    events.push_back(std::make_unique<PhaseEvents>(streams.size()));
  LaunchGate gate(streams.size());
  std::vector<std::vector<double>> samples(phases.size());
  const bool split = plan.gated && plan.traces;
  std::vector<std::vector<std::vector<double>>> splits(phases.size());
  for (int it = 0; it < plan.warmup + plan.iters; ++it) {
    for (size_t p = 0; p < phases.size(); ++p) {
      {
        GateScope scope(plan.gated ? &gate : nullptr, streams);
        events[p]->begin(streams);
        phases[p]();
        events[p]->end(streams);
      }
      sync();
      if (plan.gated && gate.timed_out())
        throw std::runtime_error(
            "the launch gate timed out: a call blocked the host while the streams were held, so "
            "this timing is not valid");
      if (it < plan.warmup) continue;
      const double span = events[p]->span_us();
      samples[p].push_back(span);
      if (split)
        if (auto v = split_sample(gate.released_ns(), plan.traces(), span))
          splits[p].push_back(std::move(*v));
    }
  }
  PhaseTimes out;
  for (size_t p = 0; p < phases.size(); ++p) {
    out.phase.push_back(summarize(std::move(samples[p])));
    out.split.push_back(splits[p].empty() ? std::nullopt
                                          : std::optional<PhaseSplit>(summarize_split(splits[p])));
  }
  return out;
}

namespace {

/// Ends a stream capture left open by an exception.
class CaptureScope {
 public:
  explicit CaptureScope(cudaStream_t stream) : stream_(stream) {
    MOECOMM_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
  }
  ~CaptureScope() {
    if (!stream_) return;
    cudaGraph_t graph = nullptr;
    cudaStreamEndCapture(stream_, &graph);
    if (graph) cudaGraphDestroy(graph);
  }
  cudaGraph_t finish() {
    cudaGraph_t graph = nullptr;
    cudaStream_t s = stream_;
    stream_ = nullptr;
    MOECOMM_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    return graph;
  }

 private:
  cudaStream_t stream_;
};

/// Events that fork streams from stream 0 and join them back, inside a capture.
class ForkJoin {
 public:
  explicit ForkJoin(const std::vector<cudaStream_t>& streams)
      : streams_(streams), events_(streams.size()) {
    for (auto& e : events_)
      MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  ~ForkJoin() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  ForkJoin(const ForkJoin&) = delete;
  ForkJoin& operator=(const ForkJoin&) = delete;

  void fork() {
    moecomm::detail::streams_wait(streams_.data() + 1, static_cast<int>(streams_.size()) - 1,
                                  streams_[0], events_[0]);
  }
  void join() {
    for (size_t r = 1; r < streams_.size(); ++r)
      moecomm::detail::stream_wait(streams_[0], streams_[r], events_[r]);
  }

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> events_;
};

}  // namespace

GroupGraph::GroupGraph(const std::vector<cudaStream_t>& streams, const Phase& issue)
    : origin_(streams.at(0)) {
  ForkJoin edges(streams);
  cudaGraph_t graph = nullptr;
  {
    CaptureScope capture(origin_);
    edges.fork();
    issue();
    edges.join();
    graph = capture.finish();
  }
  const cudaError_t err = cudaGraphInstantiate(&exec_, graph, 0);
  cudaGraphDestroy(graph);
  MOECOMM_CUDA_CHECK(err);
}

GroupGraph::~GroupGraph() {
  if (exec_) cudaGraphExecDestroy(exec_);
}

void GroupGraph::launch() const {
  MOECOMM_CUDA_CHECK(cudaGraphLaunch(exec_, origin_));
}

PhaseTimes GroupGraph::time(const TimingPlan& plan, const std::function<void()>& sync) const {
  return time_phases({origin_}, plan, {[this] { launch(); }}, sync);
}

double measure_copy_rate(int device) {
  MOECOMM_CUDA_CHECK(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  MOECOMM_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const size_t bytes = std::max(kMinCopyBytes, std::min(kCopyBytes, free_bytes / 4));
  DeviceBuffer<uint8_t> src(bytes), dst(bytes);
  MOECOMM_CUDA_CHECK(cudaMemset(src.get(), 1, bytes));
  cudaStream_t stream;
  cudaEvent_t start, stop;
  MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOECOMM_CUDA_CHECK(cudaEventCreate(&start));
  MOECOMM_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> seconds;
  for (int i = 0; i < kCopyWarmup + kCopyIters; ++i) {
    MOECOMM_CUDA_CHECK(cudaEventRecord(start, stream));
    MOECOMM_CUDA_CHECK(
        cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, stream));
    MOECOMM_CUDA_CHECK(cudaEventRecord(stop, stream));
    MOECOMM_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    if (i >= kCopyWarmup) seconds.push_back(1e-3 * ms);
  }
  MOECOMM_CUDA_CHECK(cudaEventDestroy(start));
  MOECOMM_CUDA_CHECK(cudaEventDestroy(stop));
  MOECOMM_CUDA_CHECK(cudaStreamDestroy(stream));
  const double median = summarize(seconds).median;  // seconds here, not µs
  return 2.0 * static_cast<double>(bytes) / median;
}

}  // namespace epb
