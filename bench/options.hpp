// ep_bench's command line.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "moecomm/config.hpp"

namespace epb {

enum class RoutingKind { kUniform, kZipf, kGroup };
enum class SweepAxis { kNone, kTokens, kHidden, kSms };

const char* routing_name(RoutingKind kind);
const char* axis_name(SweepAxis axis);

/// Bad command-line usage: main prints it with the usage hint and exits with 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  bool run_ht = true;
  bool run_ll = true;
  int device = 0;
  int ranks = 8;
  int ht_tokens = 4096;  ///< DeepEP / NCCL EP standard shapes
  int ll_tokens = 128;
  int hidden = 7168;
  int topk = 8;
  int experts = 256;
  bool fp8 = true;  ///< fp8 dispatch (quantised on the way); combine is always bf16
  int num_sms = 16;
  int threads = 512;
  int warmup = 10;
  int iters = 50;
  RoutingKind routing = RoutingKind::kUniform;
  double zipf_s = 1.0;
  int topk_groups = 0;  ///< group routing: rank groups per token; 0 = ranks / 2 (at least K / L)
  bool cached = false;
  bool graph = false;
  bool staged = false;
  bool phases = false;  ///< split each op's time by the device's phase marks (virtual ranks)
  uint64_t seed = 1;
  std::string json_path;
  SweepAxis sweep = SweepAxis::kNone;
  std::vector<int> points;  ///< sweep points; empty = the axis' defaults
  bool tune = false;
  std::string tune_out = "moecomm_tuned.cfg";
  std::string config_path;
  /// Virtual nodes: ranks r*G .. r*G+G-1 (G = ranks / nodes) form node r; ranks of different
  /// nodes talk only through the loopback RDMA engine and its NIC model.
  int nodes = 1;
  double nic_gbps = 50.0;       ///< NIC model (nodes > 1): GB/s (1e9 bytes) per rank
  double nic_latency_us = 2.0;  ///< NIC model (nodes > 1): added to each signal

  /// The fields no option sets (scale format, alignment, time-out...): defaults, or the --config
  /// file. Shape, mode, tokens and resources are filled in per benchmark point.
  moecomm::Config base;
  /// Long names of the options given on the command line (they win over --config).
  std::set<std::string> given;
};

/// Parses argv; throws UsageError. `--help` prints the usage and exits with 0.
Options parse_options(int argc, char** argv);
/// The usage text.
std::string usage();
/// Applies --config FILE (if any): its shape and resource fields fill the options the command
/// line did not give.
void apply_config_file(Options& options);

}  // namespace epb
