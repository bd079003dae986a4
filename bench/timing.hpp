// Timing R ranks' work on R streams with CUDA events.
//
// Every phase (one op on every rank) is timed on its own: a gate kernel on every stream holds the
// streams while the host enqueues the phase (one host store releases them all at once), each rank
// records a start event after its gate and an end event after its op, and the phase's time runs
// from the earliest start to the latest end. The host waits for the phase before the next one,
// so phase p + 1 never overlaps phase p. An op that spans phases (dispatch then combine) is timed
// as one phase that issues both.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <optional>
#include <vector>

#include "moecomm/communicator.hpp"

namespace epb {

/// Median and spread of a set of samples, in microseconds.
struct Stats {
  double median = 0, p10 = 0, p90 = 0, min = 0, max = 0, mean = 0;
  int samples = 0;
};

Stats summarize(std::vector<double> us);

/// A phase issues one op on every rank (rank after rank, or through parallel_for).
using Phase = std::function<void()>;

/// Where a gated phase's time went (ep_bench --phases), µs, medians over the timed iterations of
/// the group's timeline: the launch gate's release, then the device's phase marks of every rank's
/// last call (moecomm::CallTrace; a mark of the group is its latest rank's, the start its
/// earliest), then the last end event. Per iteration the parts add up to the phase's time.
struct PhaseSplit {
  double launch = 0;       ///< release -> the group's first block began (the front end)
  double block_start = 0;  ///< -> every block of every rank began
  double open = 0;         ///< -> every rank passed its opening round
  double stream = 0;       ///< -> every rank moved its rows
  double close = 0;        ///< -> every rank's closing round was done
  double receive = 0;      ///< LL dispatch: -> every rank's receive phase had its counts
  double tail = 0;         ///< -> the last end event (the kernels' exit)
  int samples = 0;
};

struct TimingPlan {
  int warmup = 0;
  int iters = 1;
  /// Hold the streams behind the launch gate while the host enqueues, so that host launch time
  /// is not measured. Off for calls that wait on the host (exact HT sizing).
  bool gated = true;
  /// With it (and gated), each timed iteration's PhaseSplit: every rank's last call's trace,
  /// read after the phase's sync.
  std::function<std::vector<moecomm::CallTrace>()> traces;
};

struct PhaseTimes {
  std::vector<Stats> phase;                      ///< one per phase
  std::vector<std::optional<PhaseSplit>> split;  ///< one per phase, with plan.traces
};

/// Runs plan.warmup + plan.iters iterations of the phases; `sync` waits for every stream (and
/// raises device errors) after each phase.
PhaseTimes time_phases(const std::vector<cudaStream_t>& streams, const TimingPlan& plan,
                       const std::vector<Phase>& phases, const std::function<void()>& sync);

/// One CUDA graph holding one op of every rank: `issue` runs while stream 0 captures and every
/// other stream is forked from it (and joined back), so one launch runs the whole group. Eager
/// calls cost one front-end launch per rank and kernel, and on one GPU those launches serialise
/// (8 streams x 1 empty kernel: ~29 us from release to the last end; one graph of the same: ~9 us).
class GroupGraph {
 public:
  GroupGraph(const std::vector<cudaStream_t>& streams, const Phase& issue);
  ~GroupGraph();
  GroupGraph(const GroupGraph&) = delete;
  GroupGraph& operator=(const GroupGraph&) = delete;

  void launch() const;  ///< on stream 0
  /// Gated launches on stream 0, timed like a phase; `sync` as for time_phases.
  PhaseTimes time(const TimingPlan& plan, const std::function<void()>& sync) const;

 private:
  cudaStream_t origin_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

/// Device-to-device copy rate of `device` (bytes read + bytes written per second), from a large
/// cudaMemcpyAsync; the ceiling the "necessary HBM bytes" are compared with.
double measure_copy_rate(int device);

}  // namespace epb
