#include "runner.hpp"

#include <algorithm>
#include <functional>
#include <memory>
#include <string>

#include "moecomm/moecomm.hpp"
#include "naive.hpp"
#include "verify.hpp"

namespace epb {

using moecomm::CombineArgs;
using moecomm::CombineOutput;
using moecomm::DispatchArgs;
using moecomm::DispatchOptions;
using moecomm::DispatchOutput;
using moecomm::Sizing;
using moecomm::TensorView;
using moecomm::VirtualGroup;

namespace {

/// Every op's JSON key and table name.
struct OpLabel {
  Op op;
  const char* key;
  const char* name;
};

constexpr OpLabel kOpLabels[] = {
    {Op::kDispatch, "dispatch", "dispatch"},
    {Op::kCombine, "combine", "combine"},
    {Op::kCachedDispatch, "cached_dispatch", "dispatch (cached)"},
    {Op::kExactDispatch, "exact_dispatch", "dispatch (exact)"},
    {Op::kRoundTrip, "round_trip", "dispatch+combine"},
    {Op::kGraphDispatch, "graph_dispatch", "dispatch (graph)"},
    {Op::kGraphCombine, "graph_combine", "combine (graph)"},
    {Op::kGraphRoundTrip, "graph_round_trip", "dispatch+combine (graph)"},
    {Op::kDispatchSend, "dispatch_send", "dispatch send phase"},
    {Op::kDispatchRecv, "dispatch_recv", "dispatch recv phase"},
    {Op::kStagedDispatch, "staged_dispatch", "dispatch + copy-out"},
    {Op::kOneLaunchDispatch, "one_launch_dispatch", "dispatch (1 launch)"},
    {Op::kOneLaunchCombine, "one_launch_combine", "combine (1 launch)"},
    {Op::kOneLaunchGraphDispatch, "one_launch_graph_dispatch", "dispatch (1 launch, graph)"},
    {Op::kOneLaunchGraphCombine, "one_launch_graph_combine", "combine (1 launch, graph)"},
    {Op::kOneLaunchGraphRoundTrip, "one_launch_graph_round_trip", "disp+comb (1 launch, graph)"},
};

const OpLabel* label_of(Op op) {
  for (const OpLabel& l : kOpLabels)
    if (l.op == op) return &l;
  return nullptr;
}

}  // namespace

const char* op_key(Op op) {
  const OpLabel* l = label_of(op);
  return l ? l->key : "?";
}

const char* op_name(Op op) {
  const OpLabel* l = label_of(op);
  return l ? l->name : "?";
}

namespace {

constexpr int kExactMaxWarmup = 3;
constexpr int kExactMaxIters = 20;  // exact sizing waits on the host: fewer samples suffice

// ---------------------------------------------------------------------------------------------
// Driving the ranks

/// One benchmark session: the group and the per-rank arguments.
class Session {
 public:
  Session(const Workload& wl, const moecomm::Config& config)
      : wl_(wl), group_(config, wl.shape.ranks, {wl.device}, wl.shape.nodes) {}

  int ranks() const { return wl_.shape.ranks; }
  VirtualGroup& group() { return group_; }
  std::vector<cudaStream_t> streams() {
    std::vector<cudaStream_t> s;
    for (int r = 0; r < ranks(); ++r) s.push_back(group_[r].stream());
    return s;
  }
  void sync() { group_.synchronize(); }

  DispatchArgs dispatch_args(int r) const {
    DispatchArgs a;
    a.x = wl_.x_view(r);
    a.topk_idx = wl_.idx_view(r);
    a.topk_weights = wl_.weights_view(r);
    return a;
  }
  DispatchOptions dispatch_options(Sizing sizing) const {
    DispatchOptions o;
    o.quantize_fp8 = wl_.shape.fp8;
    o.sizing = sizing;
    return o;
  }
  CombineArgs combine_args(int r) const {
    CombineArgs a;
    a.y = wl_.y_view(r);
    if (!wl_.shape.ht()) a.topk_weights = wl_.weights_view(r);
    return a;
  }

  /// Every rank dispatches, rank after rank (calls that never wait on the host).
  void dispatch_each(std::vector<DispatchOutput>& out, const DispatchOptions& options) {
    for (int r = 0; r < ranks(); ++r) out[r] = group_[r].dispatch(dispatch_args(r), options);
  }
  void combine_each(const std::vector<DispatchOutput>& d, std::vector<CombineOutput>* out) {
    for (int r = 0; r < ranks(); ++r) {
      CombineOutput c = group_[r].combine(combine_args(r), d[r].handle);
      if (out) (*out)[r] = c;
    }
  }
  void cached_dispatch_each(const std::vector<DispatchOutput>& prev,
                            std::vector<DispatchOutput>* out) {
    for (int r = 0; r < ranks(); ++r) {
      DispatchOptions o = dispatch_options(Sizing::kWorstCase);
      o.previous_handle = &prev[r].handle;
      DispatchOutput d = group_[r].dispatch(dispatch_args(r), o);
      if (out) (*out)[r] = std::move(d);
    }
  }
  /// LL: every rank's call as one kernel (VirtualGroup::dispatch_all / combine_all).
  void dispatch_one_launch(std::vector<DispatchOutput>& out, const DispatchOptions& options) {
    std::vector<DispatchArgs> args;
    for (int r = 0; r < ranks(); ++r) args.push_back(dispatch_args(r));
    out = group_.dispatch_all(args, options);
  }
  void combine_one_launch(const std::vector<DispatchOutput>& d, std::vector<CombineOutput>* out) {
    std::vector<CombineArgs> args;
    std::vector<moecomm::Handle> handles;
    for (int r = 0; r < ranks(); ++r) {
      args.push_back(combine_args(r));
      handles.push_back(d[r].handle);
    }
    std::vector<CombineOutput> c = group_.combine_all(args, handles);
    if (out) *out = std::move(c);
  }
  /// Exact sizing waits on the host for the count exchange: one host thread per rank.
  void exact_dispatch_each(std::vector<DispatchOutput>& out) {
    const DispatchOptions o = dispatch_options(Sizing::kExact);
    group_.parallel_for([&](int r) { out[r] = group_[r].dispatch(dispatch_args(r), o); });
  }

 private:
  const Workload& wl_;
  VirtualGroup group_;
};

/// Runs `rounds` dispatch + combine rounds, which reveal where every output lives, then poisons
/// those outputs.
void reveal_and_poison(Session& s, int rounds, const DispatchOptions& options,
                       std::vector<DispatchOutput>& d, std::vector<CombineOutput>& c) {
  for (int round = 0; round < rounds; ++round) {
    s.dispatch_each(d, options);
    s.combine_each(d, &c);
    s.sync();
    for (int r = 0; r < s.ranks(); ++r) {
      poison(d[r]);
      poison(c[r].out);
    }
  }
}

/// HT: every form that is timed, each after poisoning the outputs of an earlier call.
void verify_ht(Session& s, const Workload& wl, const Extras& extras) {
  const int R = s.ranks();
  std::vector<DispatchOutput> d(R), again(R);
  std::vector<CombineOutput> c(R);
  const DispatchOptions worst = s.dispatch_options(Sizing::kWorstCase);
  reveal_and_poison(s, /*rounds=*/1, worst, d, c);

  s.dispatch_each(d, worst);
  s.sync();
  for (int r = 0; r < R; ++r) check_ht_dispatch(wl, r, d[r], "HT dispatch");
  s.combine_each(d, &c);
  s.sync();
  for (int r = 0; r < R; ++r) check_combine(wl, r, c[r].out, "HT combine");
  if (extras.cached) {
    for (int r = 0; r < R; ++r) poison(d[r]);
    s.cached_dispatch_each(d, &again);
    s.sync();
    for (int r = 0; r < R; ++r) check_ht_dispatch(wl, r, again[r], "HT cached dispatch");
  }
  if (extras.exact) {
    for (int r = 0; r < R; ++r) poison(d[r]);
    s.exact_dispatch_each(again);
    s.sync();
    for (int r = 0; r < R; ++r) check_ht_dispatch(wl, r, again[r], "HT exact dispatch");
  }
}

/// LL: two rounds reveal both alternating buffers; the third call is checked.
void verify_ll(Session& s, const Workload& wl) {
  const int R = s.ranks();
  std::vector<DispatchOutput> d(R);
  std::vector<CombineOutput> c(R);
  const DispatchOptions options = s.dispatch_options(Sizing::kWorstCase);
  reveal_and_poison(s, /*rounds=*/2, options, d, c);  // both alternating buffers
  s.dispatch_each(d, options);
  s.sync();
  for (int r = 0; r < R; ++r) check_ll_dispatch(wl, r, d[r], "LL dispatch");
  s.combine_each(d, &c);
  s.sync();
  for (int r = 0; r < R; ++r) check_combine(wl, r, c[r].out, "LL combine");
}

// ---------------------------------------------------------------------------------------------
// CUDA graphs: one graph per op for the whole group

/// Dispatch, combine and the two in a row, each captured as one graph for the whole group,
/// each checked once against the reference before it is timed.
using DispatchCall = std::function<void(Session&, std::vector<DispatchOutput>&)>;
using CombineCall =
    std::function<void(Session&, const std::vector<DispatchOutput>&, std::vector<CombineOutput>*)>;

/// Every rank's call issued rank after rank (one launch per rank and kernel).
DispatchCall per_rank_dispatch(const DispatchOptions& options) {
  return [options](Session& s, std::vector<DispatchOutput>& d) { s.dispatch_each(d, options); };
}
CombineCall per_rank_combine() {
  return [](Session& s, const std::vector<DispatchOutput>& d, std::vector<CombineOutput>* c) {
    s.combine_each(d, c);
  };
}

OpTimes time_group_graphs(Session& s, const Workload& wl, const TimingPlan& plan,
                          const DispatchCall& issue_dispatch, const CombineCall& issue_combine) {
  const int R = s.ranks();
  const bool ht = wl.shape.ht();
  const auto sync = [&] { s.sync(); };
  auto check_dispatch = [&](const std::vector<DispatchOutput>& d, const char* form) {
    for (int r = 0; r < R; ++r)
      ht ? check_ht_dispatch(wl, r, d[r], form) : check_ll_dispatch(wl, r, d[r], form);
  };
  auto check_outputs = [&](const std::vector<CombineOutput>& c, const char* form) {
    for (int r = 0; r < R; ++r) check_combine(wl, r, c[r].out, form);
  };
  OpTimes t;

  std::vector<DispatchOutput> d(R);
  const GroupGraph dispatch(s.streams(), [&] { issue_dispatch(s, d); });
  for (auto& o : d) poison(o);
  dispatch.launch();
  s.sync();
  check_dispatch(d, "dispatch graph");
  const PhaseTimes td = dispatch.time(plan, sync);
  t.dispatch = td.phase[0];
  t.dispatch_split = td.split[0];

  std::vector<CombineOutput> c(R);
  const GroupGraph combine(s.streams(), [&] { issue_combine(s, d, &c); });
  for (auto& o : c) poison(o.out);
  combine.launch();
  s.sync();
  check_outputs(c, "combine graph");
  const PhaseTimes tc = combine.time(plan, sync);
  t.combine = tc.phase[0];
  t.combine_split = tc.split[0];

  std::vector<DispatchOutput> rd(R);
  std::vector<CombineOutput> rc(R);
  const GroupGraph round(s.streams(), [&] {
    issue_dispatch(s, rd);
    issue_combine(s, rd, &rc);
  });
  for (auto& o : rc) poison(o.out);
  round.launch();
  s.sync();
  check_outputs(rc, "dispatch+combine graph");
  TimingPlan whole = plan;
  whole.traces = nullptr;  // two calls a rank: the trace holds only the second
  t.round_trip = round.time(whole, sync).phase[0];
  return t;
}

// ---------------------------------------------------------------------------------------------
// Timings

/// Caller-owned tensors for every rank's HT dispatch outputs, and the copies that fill them: the
/// work a design without in-place rows (receive into a staging buffer, then copy out) adds.
class StagedCopies {
 public:
  explicit StagedCopies(const Workload& wl) {
    const Shape& sh = wl.shape;
    for (int r = 0; r < sh.ranks; ++r) {
      const size_t n = static_cast<size_t>(wl.expected.ht[r].num_recv);
      bytes_.push_back({n * sh.data_row_bytes(), n * sizeof(float) * sh.scale_groups(),
                        n * sizeof(int64_t) * sh.topk, n * sizeof(float) * sh.topk,
                        n * sizeof(int32_t)});
      std::vector<DeviceBuffer<uint8_t>> own;
      for (size_t b : bytes_.back()) own.emplace_back(std::max<size_t>(b, 1));
      buffers_.push_back(std::move(own));
    }
  }
  void copy_out(const std::vector<DispatchOutput>& d, const std::vector<cudaStream_t>& streams) {
    for (size_t r = 0; r < d.size(); ++r) {
      const TensorView* from[] = {&d[r].recv_x, &d[r].recv_x_scales, &d[r].recv_topk_idx,
                                  &d[r].recv_topk_weights, &d[r].recv_src_token};
      for (size_t i = 0; i < bytes_[r].size(); ++i)
        if (bytes_[r][i] > 0 && from[i]->present())
          MOECOMM_CUDA_CHECK(cudaMemcpyAsync(buffers_[r][i].get(), from[i]->data, bytes_[r][i],
                                             cudaMemcpyDeviceToDevice, streams[r]));
    }
  }

 private:
  std::vector<std::vector<size_t>> bytes_;
  std::vector<std::vector<DeviceBuffer<uint8_t>>> buffers_;
};

OpResult result(Op op, const Stats& time, const Traffic& traffic, const Stats& naive,
                const std::optional<PhaseSplit>& split = std::nullopt) {
  return {op, time, traffic, naive, 0.0, split};
}

/// The plan without phase splits (ops of more than one call a rank).
TimingPlan unsplit(TimingPlan plan) {
  plan.traces = nullptr;
  return plan;
}

void add_graph_ops(std::vector<OpResult>& out, Session& s, const Workload& wl,
                   const TimingPlan& plan, const NaiveTimes& naive) {
  const OpTimes g = time_group_graphs(
      s, wl, plan, per_rank_dispatch(s.dispatch_options(Sizing::kWorstCase)), per_rank_combine());
  const Traffic dt = wl.dispatch_traffic(), ct = wl.combine_traffic();
  out.push_back(result(Op::kGraphDispatch, g.dispatch, dt, naive.graph.dispatch, g.dispatch_split));
  out.push_back(result(Op::kGraphCombine, g.combine, ct, naive.graph.combine, g.combine_split));
  out.push_back(result(Op::kGraphRoundTrip, g.round_trip, sum(dt, ct), naive.graph.round_trip));
}

/// LL through VirtualGroup::dispatch_all / combine_all: plain, and captured as one graph.
void add_one_launch_ops(std::vector<OpResult>& out, Session& s, const Workload& wl,
                        const TimingPlan& plan, const NaiveTimes& naive) {
  const DispatchOptions options = s.dispatch_options(Sizing::kWorstCase);
  const DispatchCall dispatch = [options](Session& ss, std::vector<DispatchOutput>& d) {
    ss.dispatch_one_launch(d, options);
  };
  const CombineCall combine = [](Session& ss, const std::vector<DispatchOutput>& d,
                                 std::vector<CombineOutput>* c) { ss.combine_one_launch(d, c); };
  const int R = s.ranks();
  std::vector<DispatchOutput> d(R), before(R);
  std::vector<CombineOutput> c(R);
  // Two rounds reveal both alternating buffers; poisoned, then a third round is checked.
  for (int round = 0; round < 2; ++round) {
    dispatch(s, round == 0 ? before : d);
    combine(s, round == 0 ? before : d, &c);
    s.sync();
  }
  for (int r = 0; r < R; ++r) {
    poison(before[r]);
    poison(d[r]);
    poison(c[r].out);
  }
  dispatch(s, d);
  s.sync();
  for (int r = 0; r < R; ++r) check_ll_dispatch(wl, r, d[r], "LL one-launch dispatch");
  combine(s, d, &c);
  s.sync();
  for (int r = 0; r < R; ++r) check_combine(wl, r, c[r].out, "LL one-launch combine");
  const PhaseTimes t =
      time_phases(s.streams(), plan, {[&] { dispatch(s, d); }, [&] { combine(s, d, nullptr); }},
                  [&] { s.sync(); });
  const OpTimes g = time_group_graphs(s, wl, plan, dispatch, combine);
  const Traffic dt = wl.dispatch_traffic(), ct = wl.combine_traffic();
  out.push_back(result(Op::kOneLaunchDispatch, t.phase[0], dt, naive.dispatch, t.split[0]));
  out.push_back(result(Op::kOneLaunchCombine, t.phase[1], ct, naive.combine, t.split[1]));
  out.push_back(
      result(Op::kOneLaunchGraphDispatch, g.dispatch, dt, naive.graph.dispatch, g.dispatch_split));
  out.push_back(
      result(Op::kOneLaunchGraphCombine, g.combine, ct, naive.graph.combine, g.combine_split));
  out.push_back(
      result(Op::kOneLaunchGraphRoundTrip, g.round_trip, sum(dt, ct), naive.graph.round_trip));
}

std::vector<OpResult> time_ht(Session& s, const Workload& wl, const TimingPlan& plan,
                              const Extras& extras, const NaiveTimes& naive) {
  const int R = s.ranks();
  std::vector<DispatchOutput> d(R);
  const DispatchOptions worst = s.dispatch_options(Sizing::kWorstCase);
  std::vector<Phase> phases = {[&] { s.dispatch_each(d, worst); },
                               [&] { s.combine_each(d, nullptr); }};
  if (extras.cached) phases.push_back([&] { s.cached_dispatch_each(d, nullptr); });
  const PhaseTimes t = time_phases(s.streams(), plan, phases, [&] { s.sync(); });

  const Traffic dt = wl.dispatch_traffic(), ct = wl.combine_traffic();
  std::vector<OpResult> out = {result(Op::kDispatch, t.phase[0], dt, naive.dispatch, t.split[0]),
                               result(Op::kCombine, t.phase[1], ct, naive.combine, t.split[1])};
  if (extras.cached)
    out.push_back(result(Op::kCachedDispatch, t.phase[2], dt, naive.dispatch, t.split[2]));
  if (extras.staged) {
    StagedCopies staged(wl);
    const PhaseTimes ts = time_phases(s.streams(), unsplit(plan), {[&] {
                                        s.dispatch_each(d, worst);
                                        staged.copy_out(d, s.streams());
                                      }},
                                      [&] { s.sync(); });
    out.push_back(result(Op::kStagedDispatch, ts.phase[0], dt, naive.dispatch));
  }
  if (extras.graph) add_graph_ops(out, s, wl, plan, naive);
  if (extras.exact) {
    std::vector<DispatchOutput> e(R);
    const TimingPlan exact_plan{std::min(plan.warmup, kExactMaxWarmup),
                                std::min(plan.iters, kExactMaxIters),
                                /*gated=*/false,
                                {}};
    const PhaseTimes te = time_phases(s.streams(), exact_plan, {[&] { s.exact_dispatch_each(e); }},
                                      [&] { s.sync(); });
    out.push_back(result(Op::kExactDispatch, te.phase[0], dt, naive.dispatch));
  }
  return out;
}

std::vector<OpResult> time_ll(Session& s, const Workload& wl, const TimingPlan& plan,
                              const Extras& extras, const NaiveTimes& naive) {
  std::vector<DispatchOutput> d(s.ranks());
  const DispatchOptions options = s.dispatch_options(Sizing::kWorstCase);
  const PhaseTimes t =
      time_phases(s.streams(), plan,
                  {[&] { s.dispatch_each(d, options); }, [&] { s.combine_each(d, nullptr); }},
                  [&] { s.sync(); });
  const Traffic dt = wl.dispatch_traffic(), ct = wl.combine_traffic();
  std::vector<OpResult> out = {result(Op::kDispatch, t.phase[0], dt, naive.dispatch, t.split[0]),
                               result(Op::kCombine, t.phase[1], ct, naive.combine, t.split[1])};
  // The two phases of dispatch apart: send (returns a hook), then every rank's hook.
  std::vector<DispatchOutput> h(s.ranks());
  DispatchOptions hooked = options;
  hooked.return_recv_hook = true;
  // No splits: the hook's trace is the send phase's call, begun before the hook's release.
  const PhaseTimes th = time_phases(s.streams(), unsplit(plan),
                                    {[&] { s.dispatch_each(h, hooked); },
                                     [&] {
                                       for (auto& o : h) o.hook();
                                     },
                                     [&] { s.combine_each(h, nullptr); }},
                                    [&] { s.sync(); });
  const Traffic nothing{};     // the receive phase moves no rows
  const Stats no_counterpart;  // the naive pipeline has no phases to compare with
  out.push_back(result(Op::kDispatchSend, th.phase[0], dt, no_counterpart));
  out.push_back(result(Op::kDispatchRecv, th.phase[1], nothing, no_counterpart));
  if (extras.graph) {
    const PhaseTimes round = time_phases(s.streams(), unsplit(plan), {[&] {
                                           s.dispatch_each(d, options);
                                           s.combine_each(d, nullptr);
                                         }},
                                         [&] { s.sync(); });
    out.push_back(result(Op::kRoundTrip, round.phase[0], sum(dt, ct), naive.round_trip));
    add_graph_ops(out, s, wl, plan, naive);
    // One launch for the group serves one node only (dispatch_all refuses a group that spans
    // nodes: its ranks would have to share one kernel across the RDMA link).
    if (wl.shape.nodes <= 1) add_one_launch_ops(out, s, wl, plan, naive);
  }
  return out;
}

/// R streams of the naive pipeline.
class StreamSet {
 public:
  explicit StreamSet(int n) : streams_(n), marks_(n) {
    for (auto& s : streams_)
      MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    for (auto& e : marks_) MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  ~StreamSet() {
    for (auto e : marks_) cudaEventDestroy(e);
    for (auto s : streams_) cudaStreamDestroy(s);
  }
  StreamSet(const StreamSet&) = delete;
  StreamSet& operator=(const StreamSet&) = delete;
  const std::vector<cudaStream_t>& get() const { return streams_; }
  void sync() const {
    for (auto s : streams_) MOECOMM_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  /// Every stream waits for what every other stream has issued so far (the expert step between
  /// a naive dispatch and its combine needs every peer's rows).
  void barrier() const {
    for (size_t r = 0; r < streams_.size(); ++r)
      MOECOMM_CUDA_CHECK(cudaEventRecord(marks_[r], streams_[r]));
    for (size_t r = 0; r < streams_.size(); ++r)
      for (size_t q = 0; q < streams_.size(); ++q)
        if (q != r) MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(streams_[r], marks_[q], 0));
  }

 private:
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> marks_;
};

}  // namespace

namespace {

/// The naive pipeline's serial NIC stage (nodes > 1): each rank's copies to and from other nodes
/// at the modelled bandwidth (full duplex: the busier direction counts), one latency per stage.
NaiveNicStage naive_nic_stage(const Workload& wl, const NicModel& nic) {
  NaiveNicStage st;
  const Shape& sh = wl.shape;
  if (sh.nodes <= 1) return st;
  st.on = true;
  st.nic = nic;
  const NaivePipeline& naive = *wl.naive;
  double rows_max = 0;
  for (int r = 0; r < sh.ranks; ++r)
    rows_max = std::max(rows_max, static_cast<double>(std::max(naive.remote_rows_sent(r),
                                                               naive.remote_rows_received(r))));
  // Dispatch moves rows as dispatched (with their scales), combine bf16 rows; either way each
  // rank's busier direction carries rows_max rows (what a rank sends in dispatch comes back in
  // combine).
  st.dispatch_bytes_max_rank = rows_max * static_cast<double>(sh.wire_row_bytes());
  st.combine_bytes_max_rank = rows_max * static_cast<double>(sh.bf16_row_bytes());
  const auto stage_us = [&](double bytes) {
    return bytes > 0 ? bytes / (nic.gbps * 1e3) + nic.latency_us : 0.0;  // GB/s = 1e3 bytes/us
  };
  st.dispatch_us = stage_us(st.dispatch_bytes_max_rank);
  st.combine_us = stage_us(st.combine_bytes_max_rank);
  return st;
}

Stats shifted(Stats s, double us) {
  s.median += us;
  s.p10 += us;
  s.p90 += us;
  s.min += us;
  s.max += us;
  s.mean += us;
  return s;
}

}  // namespace

double naive_nic_us(Op op, const NaiveNicStage& stage) {
  if (!stage.on) return 0.0;
  switch (op) {
    case Op::kCombine:
    case Op::kGraphCombine:
    case Op::kOneLaunchCombine:
    case Op::kOneLaunchGraphCombine:
      return stage.combine_us;
    case Op::kRoundTrip:
    case Op::kGraphRoundTrip:
    case Op::kOneLaunchGraphRoundTrip:
      return stage.dispatch_us + stage.combine_us;
    case Op::kDispatchRecv:  // no naive counterpart
      return 0.0;
    default:  // the forms of dispatch
      return stage.dispatch_us;
  }
}

NaiveTimes time_naive(const Workload& wl, const TimingPlan& plan, bool graphs,
                      const NicModel& nic) {
  MOECOMM_CUDA_CHECK(cudaSetDevice(wl.device));
  const NaivePipeline& naive = *wl.naive;
  const int R = wl.shape.ranks;
  StreamSet streams(R);
  // Verified with every copy; with virtual nodes timed with the intranode copies only (the
  // copies to other nodes are charged as the NIC stage below instead of at HBM speed).
  const auto dispatch_with = [&](bool remote) {
    for (int s = 0; s < R; ++s) naive.dispatch(s, streams.get()[s], remote);
  };
  const auto combine_with = [&](bool remote) {
    for (int s = 0; s < R; ++s) naive.combine(s, streams.get()[s], remote);
  };
  dispatch_with(true);
  combine_with(true);
  streams.sync();
  naive.verify(wl.shape, wl.ranks, wl.expected);
  const bool remote = wl.shape.nodes <= 1;
  const Phase dispatch = [&] { dispatch_with(remote); };
  const Phase combine = [&] { combine_with(remote); };
  const Phase round_trip = [&] {
    dispatch();
    streams.barrier();
    combine();
  };
  const auto sync = [&] { streams.sync(); };
  const PhaseTimes t = time_phases(streams.get(), plan, {dispatch, combine, round_trip}, sync);
  NaiveTimes out;
  out.nic_stage = naive_nic_stage(wl, nic);
  const NaiveNicStage& st = out.nic_stage;
  out.dispatch = shifted(t.phase[0], st.dispatch_us);
  out.combine = shifted(t.phase[1], st.combine_us);
  out.round_trip = shifted(t.phase[2], st.dispatch_us + st.combine_us);
  if (graphs) {
    out.graph.dispatch =
        shifted(GroupGraph(streams.get(), dispatch).time(plan, sync).phase[0], st.dispatch_us);
    out.graph.combine =
        shifted(GroupGraph(streams.get(), combine).time(plan, sync).phase[0], st.combine_us);
    out.graph.round_trip = shifted(GroupGraph(streams.get(), round_trip).time(plan, sync).phase[0],
                                   st.dispatch_us + st.combine_us);
  }
  return out;
}

std::vector<OpResult> run_moecomm(const Workload& wl, const moecomm::Config& config,
                                  const TimingPlan& plan, const Extras& extras,
                                  const NaiveTimes& naive) {
  MOECOMM_CUDA_CHECK(cudaSetDevice(wl.device));
  Session s(wl, config);
  TimingPlan traced = plan;
  if (extras.phases)
    traced.traces = [&s] {
      std::vector<moecomm::CallTrace> t;
      for (int r = 0; r < s.ranks(); ++r) t.push_back(s.group()[r].last_call_trace());
      return t;
    };
  std::vector<OpResult> out;
  if (wl.shape.ht()) {
    verify_ht(s, wl, extras);
    out = time_ht(s, wl, traced, extras, naive);
  } else {
    verify_ll(s, wl);
    out = time_ll(s, wl, traced, extras, naive);
  }
  for (OpResult& op : out)
    if (op.naive.samples > 0) op.naive_nic_us = naive_nic_us(op.op, naive.nic_stage);
  return out;
}

}  // namespace epb
