// Runs moecomm and the naive pipeline on one workload: the correctness gate, then the timings.
#pragma once

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
  Stats naive;  ///< the naive pipeline's counterpart
};

/// Which figures beyond dispatch and combine to take.
struct Extras {
  bool cached = false;
  bool exact = false;
  bool graph = false;
  bool staged = false;
};

/// Dispatch, combine, and the two in a row.
struct OpTimes {
  Stats dispatch, combine, round_trip;
};

/// The naive pipeline's times on a workload: plain launches, and (with graphs) each op captured
/// as one CUDA graph for the whole group.
struct NaiveTimes : OpTimes {
  OpTimes graph;
};

/// Verifies the naive pipeline's outputs, then times it.
NaiveTimes time_naive(const Workload& wl, const TimingPlan& plan, bool graphs);

/// Builds a VirtualGroup with `config`, checks every output of every timed form against the host
/// reference (throws VerificationError), then times them.
std::vector<OpResult> run_moecomm(const Workload& wl, const moecomm::Config& config,
                                  const TimingPlan& plan, const Extras& extras,
                                  const NaiveTimes& naive);

}  // namespace epb
