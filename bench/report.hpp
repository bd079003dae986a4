// ep_bench's results: the machine, every point's figures, the table and the JSON file.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "moecomm/config.hpp"
#include "options.hpp"
#include "runner.hpp"
#include "workload.hpp"

namespace epb {

struct Machine {
  std::string gpu;
  int device = 0;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;
  double memory_gib = 0;
  std::string driver_version;   ///< CUDA version the driver supports (cudaDriverGetVersion)
  std::string runtime_version;  ///< CUDA runtime in use (cudaRuntimeGetVersion)
  std::string cuda_version;     ///< CUDA toolkit ep_bench was built with
};

Machine query_machine(int device);

/// The figures of one (mode, shape, config) point.
struct PointResult {
  SweepAxis axis = SweepAxis::kNone;
  int axis_value = 0;
  Shape shape;
  moecomm::Config config;
  std::vector<OpResult> ops;
  NaiveNicStage naive_nic;  ///< nodes > 1: how the naive figures were modelled
};

struct TuneTrial {
  int num_sms = 0;
  int threads = 0;
  double score_us = 0;  ///< sum over the tuned modes of dispatch + combine medians
};

/// Everything a run produced.
struct RunRecord {
  Machine machine;
  double copy_rate = 0;  ///< bytes read + written per second, device-to-device copy
  std::string date;      ///< ISO 8601, UTC
  /// "virtual": R virtual ranks in this process; "processes": one process per rank (mpirun).
  std::string ranks_as = "virtual";
  std::vector<std::string> notes;
  std::vector<PointResult> points;
  std::vector<TuneTrial> tune_trials;
  bool tuned = false;
  moecomm::Config tuned_config;
};

/// The current time as "2025-01-31T12:00:00Z".
std::string utc_now();

void print_table(const RunRecord& run, const Options& options, std::FILE* out);
void write_json(const RunRecord& run, const Options& options, const std::string& path);

/// Derived figures of one op.
double gbps_per_rank(const Traffic& traffic, const Stats& time);
double copy_rate_fraction(const Traffic& traffic, const Stats& time, double copy_rate);
/// Virtual nodes: RDMA (across nodes) and NVLink (within nodes) GB/s per rank (DeepEP's
/// internode convention), and the RDMA figure over the modelled NIC's bandwidth.
double rdma_gbps_per_rank(const Traffic& traffic, const Stats& time);
double nvl_gbps_per_rank(const Traffic& traffic, const Stats& time);
double nic_fraction(const Traffic& traffic, const Stats& time, double nic_gbps);

}  // namespace epb
