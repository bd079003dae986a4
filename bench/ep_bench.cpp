// ep_bench: the benchmark of moecomm's dispatch and combine. R virtual ranks share the local GPU
// (VirtualGroup), or, under mpirun, one process per GPU is one rank (process_mode.hpp); every
// output is checked against the host reference before any figure is printed. See docs/bench.md.
#include <cstdio>
#include <exception>

#include "bench.hpp"
#include "bench_common.hpp"
#include "options.hpp"
#include "process_mode.hpp"
#include "report.hpp"

namespace {

constexpr int kExitFailure = 1;  // an error, or outputs that differ from the reference
constexpr int kExitUsage = 2;    // bad options, or a feature that is not built

int run(epb::Options& options) {
  const epb::RunRecord record = epb::run_benchmark(options);
  if (!options.json_path.empty()) {
    epb::write_json(record, options, options.json_path);
    std::fprintf(stderr, "ep_bench: wrote %s\n", options.json_path.c_str());
  }
  epb::print_table(record, options, stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    epb::Options options = epb::parse_options(argc, argv);
    epb::apply_config_file(options);
    // Started by mpirun (or srun) with several processes: one rank per process.
    if (epb::launcher_world_size() > 1) return epb::run_processes(argc, argv, options);
    return run(options);
  } catch (const epb::UsageError& e) {
    std::fprintf(stderr, "ep_bench: %s\n(ep_bench --help lists the options)\n", e.what());
    return kExitUsage;
  } catch (const epb::VerificationError& e) {
    std::fprintf(stderr,
                 "ep_bench: correctness check failed, no figures printed.\n  %s\n"
                 "Rerun with the same --seed to reproduce.\n",
                 e.what());
    return kExitFailure;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ep_bench: error: %s\n", e.what());
    return kExitFailure;
  }
}
