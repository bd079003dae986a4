// The benchmark driver: which points to run (defaults, sweeps), --tune, and the results.
#pragma once

#include "options.hpp"
#include "report.hpp"
#include "workload.hpp"

namespace epb {

/// A mode's point without a sweep: its Config (resources, fp8, the RDMA window and NIC model with
/// nodes > 1) and its Shape. One process per GPU runs these (process_mode.hpp).
moecomm::Config default_config(const Options& options, moecomm::Mode mode);
Shape default_shape(const Options& options, moecomm::Mode mode);

/// Runs everything the options ask for. May adjust options (SM clamp, tuned resources).
/// Throws VerificationError when any output differs from the host reference.
RunRecord run_benchmark(Options& options);

}  // namespace epb
