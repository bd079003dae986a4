// Runs moecomm and the naive pipeline on one workload: the correctness gate, then the timings.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "moecomm/config.hpp"
#include "options.hpp"
#include "timing.hpp"
#include "workload.hpp"

namespace epb {

/// What one figure measures.
enum class Op {
  kDispatch,  ///< HT worst-case sizing / LL
  kCombine,
  kCachedDispatch,  ///< HT, previous_handle
  kExactDispatch,   ///< HT, exact sizing (host waits for the counts; parallel_for)
  kRoundTrip,       ///< dispatch then combine, plain launches
  kGraphDispatch,   ///< dispatch (worst-case sizing for HT), one CUDA graph for the whole group
  kGraphCombine,    ///< combine, one CUDA graph for the whole group
  kGraphRoundTrip,  ///< dispatch then combine, one CUDA graph for the whole group
  kDispatchSend,    ///< LL dispatch with return_recv_hook: the send phase
  kDispatchRecv,    ///< LL: the receive phase (the hook)
  kStagedDispatch,  ///< HT dispatch, then its outputs copied into caller-owned tensors
  // LL through VirtualGroup::dispatch_all / combine_all (one kernel for every rank):
  kOneLaunchDispatch,
  kOneLaunchCombine,
  kOneLaunchGraphDispatch,  ///< captured as one graph
  kOneLaunchGraphCombine,
  kOneLaunchGraphRoundTrip,
};

const char* op_key(Op op);   ///< "dispatch", "cached_dispatch", ... (JSON)
const char* op_name(Op op);  ///< "dispatch (cached)", ... (table)

struct OpResult {
  Op op = Op::kDispatch;
  Stats time;
  Traffic traffic;
  Stats naive;  ///< the naive pipeline's counterpart (with nodes > 1: its modelled time)
  /// nodes > 1: the modelled NIC stage included in `naive` (0 otherwise).
  double naive_nic_us = 0;
  /// --phases, ops of one call per rank: where the time went.
  std::optional<PhaseSplit> split;
};

/// Which figures beyond dispatch and combine to take.
struct Extras {
  bool cached = false;
  bool exact = false;
  bool graph = false;
  bool staged = false;
  bool phases = false;  ///< split each single-call op's time by the device's phase marks
};

/// Dispatch, combine, and the two in a row.
struct OpTimes {
  Stats dispatch, combine, round_trip;
  std::optional<PhaseSplit> dispatch_split, combine_split;  ///< Extras::phases
};

/// The NIC that ranks of different virtual nodes talk through.
struct NicModel {
  double gbps = 0;  ///< GB/s (1e9 bytes) per rank and direction
  double latency_us = 0;
};

/// With virtual nodes, the naive figure is modelled: the measured time of the pipeline with
/// only its intranode copies, plus a serial NIC stage for the copies to other nodes (see
/// docs/bench.md, "The naive pipeline across nodes").
struct NaiveNicStage {
  bool on = false;  ///< nodes > 1
  NicModel nic;
  /// max over ranks of max(bytes sent to, bytes received from other nodes)
  double dispatch_bytes_max_rank = 0, combine_bytes_max_rank = 0;
  double dispatch_us = 0, combine_us = 0;  ///< bytes / bandwidth + latency (0 without bytes)
};

/// The naive pipeline's times on a workload: plain launches, and (with graphs) each op captured
/// as one CUDA graph for the whole group. With nodes > 1 every figure includes the NIC stage.
struct NaiveTimes : OpTimes {
  OpTimes graph;
  NaiveNicStage nic_stage;
};

/// Verifies the naive pipeline's outputs, then times it (nic: used when the workload spans
/// nodes).
NaiveTimes time_naive(const Workload& wl, const TimingPlan& plan, bool graphs, const NicModel& nic);

/// The naive NIC stage an op's naive figure includes (dispatch, combine, or both in a row).
double naive_nic_us(Op op, const NaiveNicStage& stage);

/// Builds a VirtualGroup with `config`, checks every output of every timed form against the host
/// reference (throws VerificationError), then times them.
std::vector<OpResult> run_moecomm(const Workload& wl, const moecomm::Config& config,
                                  const TimingPlan& plan, const Extras& extras,
                                  const NaiveTimes& naive);

}  // namespace epb
