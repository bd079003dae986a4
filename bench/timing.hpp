// Timing R ranks' work on R streams with CUDA events.
//
// Every iteration: a launch gate holds stream 0 while the host enqueues everything; each phase
// (one op on every rank) starts with a common fork: stream 0 waits for every rank's stream, then
// records the phase's start event, then every stream waits on it, all before any rank's op is
// launched (a stream that waited on an event recorded after rank 0's kernel would leave rank 0
// spinning alone). Each rank records its end event after its op; the phase's time is the max over
// ranks of (end_r - start). Then the gate opens and the host waits for the iteration.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <vector>

namespace epb {

/// Median and spread of a set of samples, in microseconds.
struct Stats {
  double median = 0, p10 = 0, p90 = 0, min = 0, max = 0, mean = 0;
  int samples = 0;
};

Stats summarize(std::vector<double> us);

/// A phase issues one op on every rank (rank after rank, or through parallel_for).
using Phase = std::function<void()>;

struct TimingPlan {
  int warmup = 0;
  int iters = 1;
  /// Hold the streams behind the launch gate while the host enqueues, so that host launch time
  /// is not measured. Off for calls that wait on the host (exact HT sizing).
  bool gated = true;
};

struct PhaseTimes {
  std::vector<Stats> phase;  ///< one per phase
  Stats total;               ///< first phase's start to the last phase's end
};

/// Runs plan.warmup + plan.iters iterations of the phases; `sync` waits for every stream (and
/// raises device errors) after each iteration.
PhaseTimes time_phases(const std::vector<cudaStream_t>& streams, const TimingPlan& plan,
                       const std::vector<Phase>& phases, const std::function<void()>& sync);

/// Device-to-device copy rate of `device` (bytes read + bytes written per second), from a large
/// cudaMemcpyAsync; the ceiling the "necessary HBM bytes" are compared with.
double measure_copy_rate(int device);

}  // namespace epb
