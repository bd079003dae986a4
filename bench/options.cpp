#include "options.hpp"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <sstream>

#include "moecomm/error.hpp"

namespace epb {

const char* routing_name(RoutingKind kind) {
  switch (kind) {
    case RoutingKind::kUniform:
      return "uniform";
    case RoutingKind::kZipf:
      return "zipf";
    case RoutingKind::kGroup:
      return "group";
  }
  return "?";
}

const char* axis_name(SweepAxis axis) {
  switch (axis) {
    case SweepAxis::kNone:
      return "none";
    case SweepAxis::kTokens:
      return "tokens";
    case SweepAxis::kHidden:
      return "hidden";
    case SweepAxis::kSms:
      return "sms";
  }
  return "?";
}

std::string usage() {
  return R"(usage: ep_bench [options]
Benchmarks moecomm dispatch/combine with R virtual ranks on one GPU, checks every output against
the host reference first, and compares with the naive permute -> copies -> unpermute pipeline.
Under mpirun (mpirun -np N ep_bench ...), each process is one rank on its own GPU (docs/bench.md).

  --mode ht|ll|both       which path (default both: HT 4096 tokens, LL 128 tokens per rank)
  --ranks R               virtual ranks on the GPU (default 8)
  --device D              CUDA device (default 0)
  --tokens T              tokens per rank for every selected mode
  --hidden H              hidden size (default 7168)
  --topk K                experts per token (default 8)
  --experts E             experts in total (default 256)
  --dtype fp8|bf16        dispatched dtype (default fp8: bf16 input quantised on the way)
  --num-sms N             SMs per rank (default 16; clamped to SMs / R)
  --threads N             threads per block of the communication kernels (default 512)
  --warmup N              untimed iterations (default 10)
  --iters N               timed iterations (default 50)
  --routing uniform|zipf|group
                          expert choice: uniform, Zipf-skewed popularity (--zipf-s, default 1),
                          or group-limited (--topk-groups rank groups per token, default R/2)
  --zipf-s S              Zipf exponent
  --topk-groups N         group routing: rank groups a token may use
  --cached                also time HT dispatch with previous_handle (cached layout)
  --graph                 also time dispatch, combine and both in a row, each captured as one
                          CUDA graph for the whole group (moecomm and the naive pipeline alike)
  --staged                also time HT dispatch followed by copying its outputs into
                          caller-owned tensors (what writing rows in place saves)
  --phases                split each op of one call a rank into launch, block start, opening
                          round, streaming, closing round (LL: receive) and tail, from the
                          calls' device-side phase marks (MoECommunicator::last_call_trace)
  --seed N                input seed (default 1)
  --json FILE             write every figure, the machine and the config as JSON
  --sweep tokens|hidden|sms
                          run a list of points (--points a,b,c or the axis' defaults)
  --points LIST           comma-separated sweep points
  --tune                  search num_sms and threads for the shape, save the best Config
  --tune-out FILE         where --tune writes (default moecomm_tuned.cfg)
  --config FILE           start from a Config file (Config::load_file); options given here win
  --nodes N               split the ranks into N virtual nodes of R/N ranks (default 1; must
                          divide R); ranks of different nodes talk only through the loopback
                          RDMA engine, whose NIC model the next two options set
  --nic-gbps X            modelled NIC bandwidth per rank, GB/s (default 50: 400 Gb/s)
  --nic-latency-us X      modelled NIC latency per signal, us (default 2)
  --virtual-nodes N       the same as --nodes
  --help                  this text
)";
}

namespace {

long long parse_int(const std::string& flag, const std::string& text, long long lo) {
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || v < lo)
    throw UsageError(flag + ": expected an integer >= " + std::to_string(lo) + ", got '" + text +
                     "'");
  return v;
}

double parse_positive(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v > 0.0))
    throw UsageError(flag + ": expected a positive number, got '" + text + "'");
  return v;
}

double parse_non_negative(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(v >= 0.0))
    throw UsageError(flag + ": expected a number >= 0, got '" + text + "'");
  return v;
}

template <typename T>
T parse_choice(const std::string& flag, const std::string& text,
               const std::map<std::string, T>& choices) {
  const auto it = choices.find(text);
  if (it != choices.end()) return it->second;
  std::string names;
  for (const auto& [name, value] : choices) names += (names.empty() ? "" : ", ") + name;
  throw UsageError(flag + ": expected one of " + names + ", got '" + text + "'");
}

std::vector<int> parse_list(const std::string& flag, const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(static_cast<int>(parse_int(flag, item, 1)));
  if (out.empty()) throw UsageError(flag + ": expected a comma-separated list of integers");
  return out;
}

using Setter = std::function<void(Options&, const std::string&)>;

/// Options that take a value.
const std::map<std::string, Setter>& value_options() {
  static const std::map<std::string, Setter> table = {
      {"--mode",
       [](Options& o, const std::string& v) {
         const int m = parse_choice<int>("--mode", v, {{"ht", 1}, {"ll", 2}, {"both", 3}});
         o.run_ht = m & 1;
         o.run_ll = m & 2;
       }},
      {"--ranks", [](Options& o, const std::string& v) { o.ranks = parse_int("--ranks", v, 1); }},
      {"--device",
       [](Options& o, const std::string& v) { o.device = parse_int("--device", v, 0); }},
      {"--tokens",
       [](Options& o, const std::string& v) {
         o.ht_tokens = o.ll_tokens = static_cast<int>(parse_int("--tokens", v, 1));
       }},
      {"--hidden",
       [](Options& o, const std::string& v) { o.hidden = parse_int("--hidden", v, 8); }},
      {"--topk", [](Options& o, const std::string& v) { o.topk = parse_int("--topk", v, 1); }},
      {"--experts",
       [](Options& o, const std::string& v) { o.experts = parse_int("--experts", v, 1); }},
      {"--dtype",
       [](Options& o, const std::string& v) {
         o.fp8 = parse_choice<bool>("--dtype", v, {{"fp8", true}, {"bf16", false}});
       }},
      {"--num-sms",
       [](Options& o, const std::string& v) { o.num_sms = parse_int("--num-sms", v, 1); }},
      {"--threads",
       [](Options& o, const std::string& v) { o.threads = parse_int("--threads", v, 32); }},
      {"--warmup",
       [](Options& o, const std::string& v) { o.warmup = parse_int("--warmup", v, 0); }},
      {"--iters", [](Options& o, const std::string& v) { o.iters = parse_int("--iters", v, 1); }},
      {"--routing",
       [](Options& o, const std::string& v) {
         o.routing = parse_choice<RoutingKind>("--routing", v,
                                               {{"uniform", RoutingKind::kUniform},
                                                {"zipf", RoutingKind::kZipf},
                                                {"group", RoutingKind::kGroup}});
       }},
      {"--zipf-s",
       [](Options& o, const std::string& v) { o.zipf_s = parse_positive("--zipf-s", v); }},
      {"--topk-groups",
       [](Options& o, const std::string& v) { o.topk_groups = parse_int("--topk-groups", v, 1); }},
      {"--seed", [](Options& o, const std::string& v) { o.seed = parse_int("--seed", v, 0); }},
      {"--json", [](Options& o, const std::string& v) { o.json_path = v; }},
      {"--sweep",
       [](Options& o, const std::string& v) {
         o.sweep = parse_choice<SweepAxis>("--sweep", v,
                                           {{"tokens", SweepAxis::kTokens},
                                            {"hidden", SweepAxis::kHidden},
                                            {"sms", SweepAxis::kSms}});
       }},
      {"--points", [](Options& o, const std::string& v) { o.points = parse_list("--points", v); }},
      {"--tune-out", [](Options& o, const std::string& v) { o.tune_out = v; }},
      {"--config", [](Options& o, const std::string& v) { o.config_path = v; }},
      {"--nodes", [](Options& o, const std::string& v) { o.nodes = parse_int("--nodes", v, 1); }},
      {"--virtual-nodes",
       [](Options& o, const std::string& v) { o.nodes = parse_int("--virtual-nodes", v, 1); }},
      {"--nic-gbps",
       [](Options& o, const std::string& v) { o.nic_gbps = parse_positive("--nic-gbps", v); }},
      {"--nic-latency-us",
       [](Options& o, const std::string& v) {
         o.nic_latency_us = parse_non_negative("--nic-latency-us", v);
       }},
  };
  return table;
}

/// Options without a value.
const std::map<std::string, Setter>& flag_options() {
  static const std::map<std::string, Setter> table = {
      {"--cached", [](Options& o, const std::string&) { o.cached = true; }},
      {"--graph", [](Options& o, const std::string&) { o.graph = true; }},
      {"--staged", [](Options& o, const std::string&) { o.staged = true; }},
      {"--phases", [](Options& o, const std::string&) { o.phases = true; }},
      {"--tune", [](Options& o, const std::string&) { o.tune = true; }},
  };
  return table;
}

void check_consistency(const Options& o) {
  if (o.threads % 32 != 0 || o.threads > 1024)
    throw UsageError("--threads: expected a multiple of 32 up to 1024, got " +
                     std::to_string(o.threads));
  if (!o.points.empty() && o.sweep == SweepAxis::kNone)
    throw UsageError("--points: needs --sweep tokens|hidden|sms");
  if (o.tune && o.sweep != SweepAxis::kNone)
    throw UsageError("--tune: tunes one shape; drop --sweep");
  if (o.ranks % o.nodes != 0)
    throw UsageError("--nodes: expected a divisor of --ranks " + std::to_string(o.ranks) +
                     ", got " + std::to_string(o.nodes));
  if (o.nodes == 1 && (o.given.count("--nic-gbps") || o.given.count("--nic-latency-us")))
    throw UsageError(
        "--nic-gbps / --nic-latency-us: model the NIC between nodes; need --nodes > 1");
}

}  // namespace

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    bool has_value = false;
    if (const auto eq = arg.find('='); eq != std::string::npos && arg.rfind("--", 0) == 0) {
      value = arg.substr(eq + 1);
      arg.resize(eq);
      has_value = true;
    }
    if (arg == "--help" || arg == "-h") {
      std::fputs(usage().c_str(), stdout);
      std::exit(0);
    }
    if (const auto f = flag_options().find(arg); f != flag_options().end()) {
      if (has_value) throw UsageError(arg + ": takes no value");
      f->second(o, "");
    } else if (const auto v = value_options().find(arg); v != value_options().end()) {
      if (!has_value) {
        if (i + 1 >= argc) throw UsageError(arg + ": expected a value");
        value = argv[++i];
      }
      v->second(o, value);
    } else {
      throw UsageError("unknown option '" + arg + "'");
    }
    o.given.insert(arg);
  }
  check_consistency(o);
  return o;
}

void apply_config_file(Options& o) {
  if (o.config_path.empty()) return;
  moecomm::Config file;
  try {
    file.load_file(o.config_path);
  } catch (const moecomm::Error& e) {
    throw UsageError(std::string("--config: ") + e.what());
  }
  const auto take = [&](const char* flag, int& field, int value) {
    if (!o.given.count(flag) && value > 0) field = value;
  };
  take("--hidden", o.hidden, file.hidden);
  take("--topk", o.topk, file.topk);
  take("--experts", o.experts, file.num_experts);
  take("--num-sms", o.num_sms, file.num_sms);
  take("--threads", o.threads, file.threads_per_block);
  // The file describes one communicator: its mode picks the paths, its capacity the tokens.
  const bool ht = file.mode != moecomm::Mode::kLowLatency;
  const bool ll = file.mode != moecomm::Mode::kHighThroughput;
  if (!o.given.count("--mode")) {
    o.run_ht = ht;
    o.run_ll = ll;
  }
  if (!o.given.count("--tokens") && file.max_tokens_per_rank > 0) {
    if (ht) o.ht_tokens = file.max_tokens_per_rank;
    if (ll) o.ll_tokens = file.ll_capacity();
  }
  o.base = file;
}

}  // namespace epb
