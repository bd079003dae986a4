#include "bench.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <random>
#include <stdexcept>

#include "moecomm/moecomm.hpp"
#include "routing.hpp"

namespace epb {
namespace {

using moecomm::Mode;

// Default sweep points.
const std::vector<int> kHtTokenPoints = {512, 1024, 2048, 4096, 8192};
const std::vector<int> kLlTokenPoints = {16, 32, 64, 128, 256};
const std::vector<int> kHiddenPoints = {2048, 4096, 6144, 7168, 8192};
const std::vector<int> kSmPoints = {4, 8, 12, 16, 20, 24, 32};
// --tune candidates (SM counts above SMs / ranks are dropped).
const std::vector<int> kTuneSms = {4, 8, 12, 16, 20, 24, 32, 48, 64};
const std::vector<int> kTuneThreads = {128, 256, 512, 768, 1024};
constexpr int kTuneMaxWarmup = 3;
constexpr int kTuneMaxIters = 20;

/// One benchmark point: a mode, a shape and the resources.
struct PointSpec {
  Mode mode = Mode::kHighThroughput;
  int tokens = 0;
  int hidden = 0;
  int num_sms = 0;
  int threads = 0;
  int axis_value = 0;
};

const char* mode_key(Mode mode) {
  return mode == Mode::kHighThroughput ? "ht" : "ll";
}

std::vector<Mode> selected_modes(const Options& o) {
  std::vector<Mode> modes;
  if (o.run_ht) modes.push_back(Mode::kHighThroughput);
  if (o.run_ll) modes.push_back(Mode::kLowLatency);
  return modes;
}

PointSpec default_point(const Options& o, Mode mode) {
  const int tokens = mode == Mode::kHighThroughput ? o.ht_tokens : o.ll_tokens;
  return {mode, tokens, o.hidden, o.num_sms, o.threads, 0};
}

moecomm::Config make_config(const Options& o, const PointSpec& p) {
  moecomm::Config c = o.base;
  c.mode = p.mode;
  c.num_experts = o.experts;
  c.hidden = p.hidden;
  c.topk = o.topk;
  c.max_tokens_per_rank = p.tokens;
  c.num_sms = p.num_sms;
  c.threads_per_block = p.threads;
  c.enable_fp8 = o.fp8;
  c.max_recv_tokens = 0;         // worst-case receive capacity: never overflows
  c.low_latency_max_tokens = 0;  // LL capacity M = tokens per rank
  if (o.nodes > 1) {             // virtual nodes: the RDMA window and the NIC model
    c.nic_model_gbps = o.nic_gbps;
    c.nic_model_latency_us = o.nic_latency_us;
    c.rdma_bytes = moecomm::required_rdma_bytes(c, o.ranks, o.nodes);
  }
  return c;
}

Shape make_shape(const Options& o, const PointSpec& p) {
  Shape s;
  s.mode = p.mode;
  s.ranks = o.ranks;
  s.nodes = o.nodes;
  s.tokens = p.tokens;
  s.hidden = p.hidden;
  s.topk = o.topk;
  s.experts = o.experts;
  s.fp8 = o.fp8;
  s.scale_format = o.base.scale_format;
  s.expert_alignment = o.base.expert_alignment;
  return s;
}

/// Sweep points of one mode; SM counts that cannot fit are dropped with a note.
std::vector<PointSpec> point_specs(const Options& o, Mode mode, int max_sms,
                                   std::vector<std::string>& notes) {
  const PointSpec base = default_point(o, mode);
  if (o.sweep == SweepAxis::kNone) return {base};
  std::vector<int> values = o.points;
  if (values.empty()) {
    switch (o.sweep) {
      case SweepAxis::kTokens:
        values = mode == Mode::kHighThroughput ? kHtTokenPoints : kLlTokenPoints;
        break;
      case SweepAxis::kHidden:
        values = kHiddenPoints;
        break;
      default:
        values = kSmPoints;
        break;
    }
  }
  std::vector<PointSpec> specs;
  for (const int v : values) {
    PointSpec p = base;
    p.axis_value = v;
    if (o.sweep == SweepAxis::kTokens) p.tokens = v;
    if (o.sweep == SweepAxis::kHidden) p.hidden = v;
    if (o.sweep == SweepAxis::kSms) {
      if (v > max_sms) {
        notes.push_back("sweep point num_sms = " + std::to_string(v) +
                        " skipped: " + std::to_string(o.ranks) + " ranks x " + std::to_string(v) +
                        " exceed the GPU's SMs");
        continue;
      }
      p.num_sms = v;
    }
    specs.push_back(p);
  }
  return specs;
}

/// ranks x num_sms must fit the GPU (co-located ranks spin on each other).
void clamp_num_sms(Options& o, const Machine& m, std::vector<std::string>& notes) {
  const int max_sms = m.sm_count / o.ranks;
  if (max_sms < 1)
    throw UsageError("--ranks " + std::to_string(o.ranks) + ": more ranks than the " +
                     std::to_string(m.sm_count) + " SMs of " + m.gpu);
  if (o.num_sms <= max_sms) return;
  const std::string note = "--num-sms " + std::to_string(o.num_sms) + " x " +
                           std::to_string(o.ranks) + " ranks exceeds the " +
                           std::to_string(m.sm_count) + " SMs of " + m.gpu + "; using " +
                           std::to_string(max_sms) + " per rank";
  std::fprintf(stderr, "ep_bench: note: %s\n", note.c_str());
  notes.push_back(note);
  o.num_sms = max_sms;
}

/// Rejects impossible points before any input is generated.
void validate_points(const Options& o, const std::vector<PointSpec>& specs) {
  for (const PointSpec& p : specs) {
    try {
      make_config(o, p).validate(o.ranks);
      std::mt19937_64 rng(o.seed);
      const Router router({o.routing, o.experts, o.topk, o.ranks, o.zipf_s, o.topk_groups}, rng);
      (void)router;  // its constructor checks the routing options
    } catch (const moecomm::InvalidArgument& e) {
      throw UsageError(std::string(mode_key(p.mode)) + ": " + e.what());
    } catch (const std::invalid_argument& e) {
      throw UsageError(e.what());
    }
  }
}

/// Keeps the last workload of each mode (inputs and references take seconds to build), and its
/// naive pipeline's times.
class WorkloadCache {
 public:
  WorkloadCache(const Options& o, const TimingPlan& plan) : options_(o), plan_(plan) {}

  Workload& get(const Shape& shape) {
    Entry& e = entries_[shape.mode];
    if (!e.workload || e.workload->shape.tokens != shape.tokens ||
        e.workload->shape.hidden != shape.hidden) {
      e = Entry{};  // free the previous one first
      std::fprintf(stderr,
                   "ep_bench: %s inputs, %d ranks x %d tokens, hidden %d: host reference...\n",
                   mode_key(shape.mode), shape.ranks, shape.tokens, shape.hidden);
      e.workload = build_workload(shape, options_);
    }
    return *e.workload;
  }
  const NaiveTimes& naive(const Shape& shape) {
    Entry& e = entries_[shape.mode];
    get(shape);
    if (!e.naive)
      e.naive = time_naive(*e.workload, plan_, options_.graph,
                           {options_.nic_gbps, options_.nic_latency_us});
    return *e.naive;
  }
  void drop(Mode mode) { entries_.erase(mode); }

 private:
  struct Entry {
    std::optional<Workload> workload;
    std::optional<NaiveTimes> naive;
  };
  const Options& options_;
  TimingPlan plan_;
  std::map<Mode, Entry> entries_;
};

TimingPlan main_plan(const Options& o) {
  return {o.warmup, o.iters, /*gated=*/true, {}};
}

/// The Config --tune writes: one mode, or Auto serving both (LL up to the LL token count).
moecomm::Config tuned_config(const Options& o, int num_sms, int threads) {
  const std::vector<Mode> modes = selected_modes(o);
  PointSpec p = default_point(o, modes.front());
  p.num_sms = num_sms;
  p.threads = threads;
  moecomm::Config c = make_config(o, p);
  if (modes.size() > 1) {
    c.mode = Mode::kAuto;
    c.max_tokens_per_rank = o.ht_tokens;
    c.auto_low_latency_max_tokens = o.ll_tokens;
  }
  return c;
}

/// Searches num_sms x threads_per_block (dispatch + combine medians, summed over the modes),
/// saves the best Config and adopts it for the figures that follow.
void tune(Options& o, int max_sms, WorkloadCache& cache, RunRecord& run) {
  std::vector<TuneTrial> trials;
  for (const int sms : kTuneSms)
    for (const int threads : kTuneThreads)
      if (sms <= max_sms) trials.push_back({sms, threads, 0.0});
  const TimingPlan plan{
      std::min(o.warmup, kTuneMaxWarmup), std::min(o.iters, kTuneMaxIters), true, {}};
  for (const Mode mode : selected_modes(o)) {
    const PointSpec base = default_point(o, mode);
    Workload& wl = cache.get(make_shape(o, base));
    for (size_t i = 0; i < trials.size(); ++i) {
      PointSpec p = base;
      p.num_sms = trials[i].num_sms;
      p.threads = trials[i].threads;
      const auto ops = run_moecomm(wl, make_config(o, p), plan, Extras{}, NaiveTimes{});
      const double us = ops[0].time.median + ops[1].time.median;
      trials[i].score_us += us;
      std::fprintf(stderr, "ep_bench: tune %s [%zu/%zu] num_sms %d, threads %d: %.1f us\n",
                   mode_key(mode), i + 1, trials.size(), p.num_sms, p.threads, us);
    }
  }
  const auto best =
      std::min_element(trials.begin(), trials.end(),
                       [](const auto& a, const auto& b) { return a.score_us < b.score_us; });
  o.num_sms = best->num_sms;
  o.threads = best->threads;
  run.tuned = true;
  run.tuned_config = tuned_config(o, best->num_sms, best->threads);
  run.tuned_config.save_file(o.tune_out);
  run.tune_trials = std::move(trials);
  std::fprintf(stderr, "ep_bench: tuned num_sms %d, threads %d -> %s\n", o.num_sms, o.threads,
               o.tune_out.c_str());
}

void print_progress(size_t index, size_t count, const Options& o, const PointSpec& spec,
                    const std::vector<OpResult>& ops) {
  std::fprintf(stderr, "ep_bench: [%zu/%zu] %s", index, count, mode_key(spec.mode));
  if (o.sweep != SweepAxis::kNone)
    std::fprintf(stderr, " %s=%d", axis_name(o.sweep), spec.axis_value);
  for (const OpResult& op : ops)
    std::fprintf(stderr, ", %s %.1f us (naive %.1f)", op_name(op.op), op.time.median,
                 op.naive.median);
  std::fprintf(stderr, "\n");
}

}  // namespace

moecomm::Config default_config(const Options& o, Mode mode) {
  return make_config(o, default_point(o, mode));
}

Shape default_shape(const Options& o, Mode mode) {
  return make_shape(o, default_point(o, mode));
}

RunRecord run_benchmark(Options& o) {
  const int devices = moecomm::cuda_device_count();
  if (devices == 0) throw std::runtime_error("no CUDA device is visible (ep_bench needs a GPU)");
  if (o.device >= devices)
    throw UsageError("--device " + std::to_string(o.device) + ": only " + std::to_string(devices) +
                     " device(s) visible");
  MOECOMM_CUDA_CHECK(cudaSetDevice(o.device));

  RunRecord run;
  run.date = utc_now();
  run.machine = query_machine(o.device);
  clamp_num_sms(o, run.machine, run.notes);
  const int max_sms = run.machine.sm_count / o.ranks;
  const auto all_specs = [&](std::vector<std::string>& notes) {
    std::vector<PointSpec> specs;
    for (const Mode mode : selected_modes(o)) {
      const auto more = point_specs(o, mode, max_sms, notes);
      specs.insert(specs.end(), more.begin(), more.end());
    }
    return specs;
  };
  std::vector<std::string> ignored;  // the notes come with the final list below
  validate_points(o, all_specs(ignored));
  std::fprintf(stderr, "ep_bench: measuring the device-to-device copy rate...\n");
  run.copy_rate = measure_copy_rate(o.device);

  WorkloadCache cache(o, main_plan(o));
  if (o.tune) tune(o, max_sms, cache, run);
  const std::vector<PointSpec> specs = all_specs(run.notes);
  const Extras extras{o.cached, /*exact=*/true, o.graph, o.staged, o.phases};
  for (size_t i = 0; i < specs.size(); ++i) {
    const PointSpec& spec = specs[i];
    const Shape shape = make_shape(o, spec);
    const NaiveTimes naive = cache.naive(shape);
    PointResult point;
    point.axis = o.sweep;
    point.axis_value = spec.axis_value;
    point.shape = shape;
    point.config = make_config(o, spec);
    point.ops = run_moecomm(cache.get(shape), point.config, main_plan(o), extras, naive);
    point.naive_nic = naive.nic_stage;
    print_progress(i + 1, specs.size(), o, spec, point.ops);
    run.points.push_back(std::move(point));
    if (i + 1 == specs.size() || specs[i + 1].mode != spec.mode) cache.drop(spec.mode);
  }
  return run;
}

}  // namespace epb
