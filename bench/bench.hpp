// The benchmark driver: which points to run (defaults, sweeps), --tune, and the results.
#pragma once

#include "options.hpp"
#include "report.hpp"

namespace epb {

/// Runs everything the options ask for. May adjust options (SM clamp, tuned resources).
/// Throws VerificationError when any output differs from the host reference.
RunRecord run_benchmark(Options& options);

}  // namespace epb
