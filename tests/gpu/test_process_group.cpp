// A group of separate processes on one GPU: peers' buffers mapped with CUDA IPC, handles carried
// over pipes by the parent (any launcher would do). Each child checks its own rank's results
// against the host reference; the parent checks every child's exit status. Processes declared as
// nodes (set_host_id) take the internode paths, their loopback engine reaching the peers' windows
// through the CUDA IPC mappings.
// The parent never initialises CUDA (fork after CUDA initialisation is unsafe).
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <csignal>
#include <random>

#include "gpu/ht_rig.hpp"
#include "gpu/process_children.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

constexpr int kRanks = 2;
constexpr int kExitNoGpu = 77;
constexpr int E = 16, K = 4, H = 256, kMaxTokens = 64;

/// Body of rank `rank`: returns 0 when every output matched the reference.
int run_rank(int rank, int to_parent, int from_parent, uint64_t seed) {
  if (cuda_device_count() == 0) return kExitNoGpu;
  Config cfg = test_config(Mode::kAuto, E, K, H, kMaxTokens);
  cfg.auto_low_latency_max_tokens = 32;  // T <= 32 takes LL, larger T takes HT
  ProcessGroupBuilder builder(cfg, rank, kRanks, 0);
  const std::vector<uint8_t> all =
      swap_handles(to_parent, from_parent, builder.local_handle(), kRanks);
  auto comm = builder.connect(all);

  int failures = 0;
  for (int64_t T : {int64_t{48}, int64_t{20}}) {  // HT, then LL (Auto)
    std::mt19937_64 rng(seed + T);  // every rank draws every rank's inputs: same reference
    auto in = make_inputs(rng, std::vector<int64_t>(kRanks, T), E, K, H, Routing::kWithDrops);
    ref::Shape shape{kRanks, E, K, H};
    std::vector<ref::Payload> payload(kRanks);
    for (int r = 0; r < kRanks; ++r) {
      payload[r].row_bytes = H * 2;
      payload[r].x.resize(in[r].x.size() * 2);
      std::memcpy(payload[r].x.data(), in[r].x.data(), payload[r].x.size());
    }
    DispatchArgs a;
    a.x = in[rank].x_view(H);
    a.topk_idx = in[rank].idx_view(K);
    a.topk_weights = in[rank].weights_view(K);
    if (T > 32) {
      for (auto& p : payload) p.topk_weights.clear();
      a.topk_weights = {};
      const auto want = ref::ht_dispatch(shape, routings(in), payload, 1);
      DispatchOutput d = comm->dispatch(a);
      comm->synchronize();
      failures += d.num_recv_tokens != want[rank].num_recv;
      if (d.num_recv_tokens == want[rank].num_recv)
        failures += count_mismatches(download<uint8_t>(d.recv_x, d.num_recv_tokens * H * 2),
                                     want[rank].x) != 0;
      // Combine the received rows themselves (registered memory) and an unregistered copy.
      std::vector<std::vector<uint16_t>> y(kRanks);
      for (int r = 0; r < kRanks; ++r) {
        y[r].resize(want[r].x.size() / 2);
        std::memcpy(y[r].data(), want[r].x.data(), want[r].x.size());
      }
      const auto want_out = ref::ht_combine(shape, routings(in), y, {}, {});
      DeviceBuffer<uint16_t> copy(y[rank]);
      for (const TensorView& yv : {d.recv_x, copy.view(DType::kBF16, {d.num_recv_tokens, H})}) {
        CombineArgs c;
        c.y = yv;
        CombineOutput o = comm->combine(c, d.handle);
        comm->synchronize();
        failures += count_mismatches(download<uint16_t>(o.out), want_out[rank].out) != 0;
      }
    } else {
      const int M = cfg.ll_capacity();
      const auto want = ref::ll_dispatch(shape, M, routings(in), payload);
      DispatchOutput d = comm->dispatch(a);
      comm->synchronize();
      failures += count_mismatches(download<int32_t>(d.recv_count), want[rank].count) != 0;
      // y = the received slots (unregistered copy: the library stages it).
      const auto got = download<uint16_t>(d.recv_x);
      std::vector<std::vector<uint16_t>> y(kRanks);
      for (int r = 0; r < kRanks; ++r) {
        y[r].resize(want[r].x.size() / 2);
        std::memcpy(y[r].data(), want[r].x.data(), want[r].x.size());
      }
      DeviceBuffer<uint16_t> ybuf(y[rank]);
      std::vector<std::vector<float>> w;
      for (auto& i : in) w.push_back(i.weights);
      const auto want_out = ref::ll_combine(shape, M, routings(in), w, y);
      CombineArgs c;
      c.y = ybuf.view(DType::kBF16, {E / kRanks, int64_t{kRanks} * M, H});
      c.topk_weights = in[rank].weights_view(K);
      CombineOutput o = comm->combine(c, d.handle);
      comm->synchronize();
      failures += count_mismatches(download<uint16_t>(o.out), want_out[rank]) != 0;
      (void)got;
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

TEST_CASE("a group of processes on one GPU (CUDA IPC): HT and LL against the reference") {
  const uint64_t s = seed();
  bool carried = false;
  const std::vector<int> rcs = run_children(
      kRanks,
      [&](int rank, int to_parent, int from_parent) {
        return run_rank(rank, to_parent, from_parent, s);
      },
      &carried);
  int no_gpu = 0;
  for (int r = 0; r < kRanks; ++r) {
    const int rc = rcs[r];
    if (rc == kExitNoGpu) {
      ++no_gpu;
      continue;
    }
    CHECK_EQ(rc, 0) << "rank " << r << " (1: outputs differ from the reference; 2: error)";
  }
  if (no_gpu == kRanks)
    skip("no CUDA device");
  else
    CHECK(carried) << "handles could not be carried";
}

namespace {

constexpr int kKillRanks = 3;
constexpr int kKillExperts = 12;  // divisible by the 3 ranks and by the survivors' 2
constexpr int kVictim = 2;
constexpr double kKillTimeout = 1.0;  // Config::timeout_seconds of the group that loses a rank
constexpr int kExitTimedOut = 0;      // survivors: TimeoutError in time, new group worked
constexpr int kExitLate = 4;          // TimeoutError, but later than timeout + 1 s
constexpr int kExitNoError = 5;       // the call "succeeded" although a peer was dead
constexpr int kExitNewGroup = 6;      // the new group of the survivors gave wrong results

/// Forms a process group of `ranks` ranks through the parent's pipes.
std::unique_ptr<MoECommunicator> connect_through(const Config& cfg, int rank, int ranks,
                                                 int to_parent, int from_parent) {
  ProcessGroupBuilder builder(cfg, rank, ranks, 0);
  return builder.connect(swap_handles(to_parent, from_parent, builder.local_handle(), ranks));
}

/// One LL dispatch + combine on `comm` checked against the reference (every rank draws every
/// rank's inputs from the shared seed). Returns true when this rank's outputs match.
bool ll_round_matches(MoECommunicator& comm, const Config& cfg, int rank, int ranks,
                      uint64_t seed) {
  const int E = cfg.num_experts;
  std::mt19937_64 rng(seed);
  auto in = make_inputs(rng, std::vector<int64_t>(ranks, 16), E, K, H, Routing::kWithDrops);
  ref::Shape shape{ranks, E, K, H};
  std::vector<ref::Payload> payload(ranks);
  for (int r = 0; r < ranks; ++r) {
    payload[r].row_bytes = H * 2;
    payload[r].x.resize(in[r].x.size() * 2);
    std::memcpy(payload[r].x.data(), in[r].x.data(), payload[r].x.size());
  }
  const int M = cfg.ll_capacity();
  const auto want = ref::ll_dispatch(shape, M, routings(in), payload);
  DispatchArgs a;
  a.x = in[rank].x_view(H);
  a.topk_idx = in[rank].idx_view(K);
  DispatchOutput d = comm.dispatch(a);
  comm.synchronize();
  bool ok = count_mismatches(download<int32_t>(d.recv_count), want[rank].count) == 0;
  std::vector<std::vector<uint16_t>> y(ranks);
  for (int r = 0; r < ranks; ++r) y[r] = random_bf16(rng, want[r].x.size() / 2);
  std::vector<std::vector<float>> w;
  for (auto& i : in) w.push_back(i.weights);
  const auto want_out = ref::ll_combine(shape, M, routings(in), w, y);
  DeviceBuffer<uint16_t> ybuf(y[rank]);
  CombineArgs c;
  c.y = ybuf.view(DType::kBF16, {E / ranks, int64_t{ranks} * M, H});
  c.topk_weights = in[rank].weights_view(K);
  CombineOutput o = comm.combine(c, d.handle);
  comm.synchronize();
  return ok && count_mismatches(download<uint16_t>(o.out), want_out[rank]) == 0;
}

/// A survivor: one good round, then a call the victim never joins (it is killed): the call must
/// end in TimeoutError within timeout + 1 s; then the group is destroyed and the survivors form
/// a new group of two, which must work.
int run_survivor(int rank, int to_parent, int from_parent, int victim_ready, uint64_t seed) {
  Config cfg = test_config(Mode::kLowLatency, kKillExperts, K, H, kMaxTokens);
  cfg.timeout_seconds = kKillTimeout;
  {
    auto comm = connect_through(cfg, rank, kKillRanks, to_parent, from_parent);
    if (!ll_round_matches(*comm, cfg, rank, kKillRanks, seed)) return 1;
    char go = 0;  // the parent says the victim is gone
    if (!read_all(victim_ready, &go, 1)) return 3;
    const auto start = std::chrono::steady_clock::now();
    try {
      std::mt19937_64 rng(seed + 1);
      auto in = make_inputs(rng, std::vector<int64_t>(kKillRanks, 16), kKillExperts, K, H,
                            Routing::kUniform);
      DispatchArgs a;
      a.x = in[rank].x_view(H);
      a.topk_idx = in[rank].idx_view(K);
      comm->dispatch(a);
      comm->synchronize();
      return kExitNoError;
    } catch (const TimeoutError& e) {
      const double s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::fprintf(stderr, "rank %d: TimeoutError after %.2f s: %s\n", rank, s, e.what());
      if (s > kKillTimeout + 1.0) return kExitLate;
    }
  }  // the broken group is destroyed here
  Config fresh = test_config(Mode::kLowLatency, kKillExperts, K, H, kMaxTokens);
  auto comm = connect_through(fresh, rank, kKillRanks - 1, to_parent, from_parent);
  return ll_round_matches(*comm, fresh, rank, kKillRanks - 1, seed + 2) ? kExitTimedOut
                                                                        : kExitNewGroup;
}

/// The victim: one good round, then it tells the parent and waits to be killed.
int run_victim(int rank, int to_parent, int from_parent, uint64_t seed) {
  Config cfg = test_config(Mode::kLowLatency, kKillExperts, K, H, kMaxTokens);
  cfg.timeout_seconds = kKillTimeout;
  auto comm = connect_through(cfg, rank, kKillRanks, to_parent, from_parent);
  if (!ll_round_matches(*comm, cfg, rank, kKillRanks, seed)) return 1;
  const char done = 1;
  write_all(to_parent, &done, 1);
  for (;;) pause();
}

}  // namespace

TEST_CASE("a peer process killed: survivors raise TimeoutError in time, then form a new group") {
  const uint64_t s = seed();
  int up[kKillRanks][2], down[kKillRanks][2], go[kKillRanks][2];
  pid_t pid[kKillRanks];
  for (int r = 0; r < kKillRanks; ++r) {
    if (pipe(up[r]) != 0 || pipe(down[r]) != 0 || pipe(go[r]) != 0)
      throw std::runtime_error("pipe failed");
    pid[r] = fork();
    if (pid[r] == 0) {
      close(up[r][0]);
      close(down[r][1]);
      close(go[r][1]);
      int rc = 2;
      try {
        if (cuda_device_count() == 0)
          rc = kExitNoGpu;
        else if (r == kVictim)
          rc = run_victim(r, up[r][1], down[r][0], s);
        else
          rc = run_survivor(r, up[r][1], down[r][0], go[r][0], s);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    close(up[r][1]);
    close(down[r][0]);
    close(go[r][0]);
  }
  // Carries one round of handles among `ranks` (the first ranks' pipes).
  auto carry = [&](int ranks) {
    std::vector<uint8_t> all;
    for (int r = 0; r < ranks; ++r) {
      std::vector<uint8_t> h(ProcessGroupBuilder::handle_size());
      if (!read_all(up[r][0], h.data(), h.size())) return false;
      all.insert(all.end(), h.begin(), h.end());
    }
    for (int r = 0; r < ranks; ++r)
      if (!write_all(down[r][1], all.data(), all.size())) return false;
    return true;
  };
  bool ok = carry(kKillRanks);
  char done = 0;
  ok = ok && read_all(up[kVictim][0], &done, 1);  // the victim finished its good round
  if (ok) {
    kill(pid[kVictim], SIGKILL);
    int status = 0;
    waitpid(pid[kVictim], &status, 0);
    pid[kVictim] = -1;
    const char g = 1;
    for (int r = 0; r < kKillRanks; ++r)
      if (r != kVictim) write_all(go[r][1], &g, 1);
    ok = carry(kKillRanks - 1);  // the survivors' new group
  }
  int no_gpu = 0;
  for (int r = 0; r < kKillRanks; ++r) {
    close(up[r][0]);
    close(down[r][1]);
    close(go[r][1]);
    if (pid[r] < 0) continue;
    int status = 0;
    waitpid(pid[r], &status, 0);
    const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (rc == kExitNoGpu) {
      ++no_gpu;
      continue;
    }
    CHECK_EQ(rc, kExitTimedOut) << "survivor " << r
                                << " (1: first round wrong; 2: error; 3: pipe; 4: TimeoutError "
                                   "later than timeout + 1 s; 5: no error; 6: new group wrong)";
  }
  if (no_gpu > 0) {  // every child found none (the victim too when it exits before its kill)
    skip("no CUDA device");
    return;
  }
  CHECK(ok) << "handles or the victim's signal could not be carried";
}

namespace {

constexpr int kExitWrongNodes = 1;     // the node layout seen differs from the declared one
constexpr int kExitNoWindowError = 8;  // connect() accepted a spanning group without a window

/// A rank of a group of two processes declared as two nodes through the host-id override
/// ("node-0", "node-1"): with a window of required_rdma_bytes, connect() must see 2 nodes of 1
/// rank; without a window, connect() must raise InvalidArgument naming rdma_bytes and the size.
int run_declared_node(int rank, int to_parent, int from_parent, bool with_window) {
  if (cuda_device_count() == 0) return kExitNoGpu;
  Config cfg = test_config(Mode::kHighThroughput, E, K, H, kMaxTokens);
  const int64_t need = required_rdma_bytes(cfg, kRanks, kRanks);
  cfg.rdma_bytes = with_window ? need : 0;
  ProcessGroupBuilder builder(cfg, rank, kRanks, 0);
  builder.set_host_id("node-" + std::to_string(rank));
  const std::vector<uint8_t> all =
      swap_handles(to_parent, from_parent, builder.local_handle(), kRanks);
  if (!with_window) {
    try {
      builder.connect(all);
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      const bool named = what.find("Config.rdma_bytes") != std::string::npos &&
                         what.find(std::to_string(need)) != std::string::npos;
      if (!named) std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
      return named ? 0 : kExitNoWindowError;
    }
    return kExitNoWindowError;
  }
  auto comm = builder.connect(all);
  if (builder.num_nodes() != kRanks || comm->num_nodes() != kRanks) {
    std::fprintf(stderr, "rank %d: saw %d node(s) (communicator: %d), declared %d\n", rank,
                 builder.num_nodes(), comm->num_nodes(), kRanks);
    return kExitWrongNodes;
  }
  return 0;
}

}  // namespace

TEST_CASE("processes declared as two nodes (host-id override): connect() sees the nodes") {
  for (bool with_window : {true, false}) {
    bool carried = false;
    const std::vector<int> rcs = run_children(
        kRanks,
        [&](int rank, int to_parent, int from_parent) {
          return run_declared_node(rank, to_parent, from_parent, with_window);
        },
        &carried);
    if (rcs[0] == kExitNoGpu && rcs[1] == kExitNoGpu) {
      skip("no CUDA device");
      return;
    }
    CHECK(carried) << "handles could not be carried";
    for (int r = 0; r < kRanks; ++r)
      CHECK_EQ(rcs[r], 0) << "rank " << r << (with_window ? " with" : " without")
                          << " a window (1: wrong node layout; 8: no rdma_bytes error; 2: error)";
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// Processes of one GPU declared as nodes (set_host_id), with data: the internode paths (HT's two
// levels, LL's puts through the engine) between processes, whose windows are mapped with CUDA
// IPC and reached by the loopback engine. Every rank draws every rank's inputs from the shared
// seed, so each computes the whole reference and checks its own outputs, every element.

/// Shape of the MoE of these groups: E a multiple of 2 and 4 ranks.
constexpr int kNodeE = 16, kNodeK = 4, kNodeH = 256, kNodeTokens = 64, kNodeM = 24;

/// The parent's relay (run_relayed_children): this child sends [u32 n][n bytes] and receives
/// [u32 total][every child's bytes, rank order]. An allgather; with no bytes, a barrier.
std::vector<uint8_t> allgather_via_parent(int to_parent, int from_parent,
                                          const std::vector<uint8_t>& mine) {
  const uint32_t n = static_cast<uint32_t>(mine.size());
  uint32_t total = 0;
  if (!write_all(to_parent, &n, sizeof(n)) || !write_all(to_parent, mine.data(), n) ||
      !read_all(from_parent, &total, sizeof(total)))
    throw std::runtime_error("the pipe to the parent broke");
  std::vector<uint8_t> all(total);
  if (!read_all(from_parent, all.data(), total))
    throw std::runtime_error("the pipe to the parent broke");
  return all;
}

void barrier_via_parent(int to_parent, int from_parent) {
  allgather_via_parent(to_parent, from_parent, {});
}

/// One child's view of its group: who it is and its pipes to the parent.
struct NodeRank {
  int rank, ranks, nodes;
  int to_parent, from_parent;
  uint64_t seed;
  std::string tag() const {
    return std::to_string(nodes) + "x" + std::to_string(ranks / nodes) + " processes, rank " +
           std::to_string(rank);
  }
  void barrier() const { barrier_via_parent(to_parent, from_parent); }
};

/// Connects a process group whose host ids declare `nodes` nodes ("node-<n>"), through the relay.
std::unique_ptr<MoECommunicator> connect_as_nodes(const Config& cfg, const NodeRank& me) {
  ProcessGroupBuilder builder(cfg, me.rank, me.ranks, 0);
  builder.set_host_id("node-" + std::to_string(me.rank / (me.ranks / me.nodes)));
  const std::vector<uint8_t> all =
      allgather_via_parent(me.to_parent, me.from_parent, builder.local_handle());
  auto comm = builder.connect(all);
  if (builder.num_nodes() != me.nodes || comm->num_nodes() != me.nodes)
    throw std::runtime_error(me.tag() + ": connect() saw " + std::to_string(builder.num_nodes()) +
                             " node(s) (communicator: " + std::to_string(comm->num_nodes()) +
                             "), declared " + std::to_string(me.nodes));
  return comm;
}

/// HT through the internode path: per sub-case a warm-up dispatch, then (every rank's receive
/// buffers poisoned between two barriers) the checked dispatch, and a combine of random y checked
/// against ref::ht_combine's two-level sum (its library output poisoned before a second run).
void ht_as_nodes(const NodeRank& me) {
  HtCase c;
  c.R = me.ranks;
  c.N = me.nodes;
  c.E = kNodeE;
  c.K = kNodeK;
  c.H = kNodeH;
  c.max_tokens = kNodeTokens;
  c.routing = Routing::kWithDrops;
  c.alignment = 2;
  Config cfg = case_config(c);  // N > 1: rdma_bytes = required_rdma_bytes(cfg, R, N)
  cfg.timeout_seconds = 10.0;
  auto comm = connect_as_nodes(cfg, me);
  const int r = me.rank;
  const ref::Shape shape{c.R, c.E, c.K, c.H};
  for (int sub = 0; sub < 4; ++sub) {
    c.payload = sub == 1   ? Payload::kFp8Quantize
                : sub == 2 ? Payload::kFp8Passthrough
                           : Payload::kBf16;
    c.sizing = sub % 2 == 0 ? Sizing::kExact : Sizing::kWorstCase;
    c.weights = sub != 3;
    c.bias = sub == 0 || sub == 3;
    c.caller_out = sub % 2 == 1;
    c.i32_idx = sub == 2;
    std::mt19937_64 rng(me.seed + 17 * static_cast<uint64_t>(sub));  // the same on every rank
    c.tokens = random_tokens(rng, c.R, c.max_tokens, false);
    c.tokens[sub % c.R] = 0;  // a rank that sends nothing
    const auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
    const SendSide send = make_send_side(c, in);
    const auto want = ref::ht_dispatch(shape, routings(in), send.payload, c.alignment);
    const std::string at = me.tag() + " HT sub-case " + std::to_string(sub) + " [" + c.name() + "]";

    DispatchOptions o;
    o.sizing = c.sizing;
    o.quantize_fp8 = c.payload == Payload::kFp8Quantize;
    const DispatchArgs args = dispatch_args(c, in, send, r);
    const DispatchOutput first = comm->dispatch(args, o);
    comm->synchronize();
    me.barrier();  // every rank's first dispatch is over
    poison_receive_buffers(c, {first});
    me.barrier();  // every rank's buffers are poisoned before any rank writes into them
    const DispatchOutput d = comm->dispatch(args, o);
    comm->synchronize();
    verify_rank_dispatch(c, d, want[r], at);

    std::vector<std::vector<uint16_t>> y(c.R), bias(c.R);
    std::vector<std::vector<float>> recv_w(c.R);
    for (int q = 0; q < c.R; ++q) {
      y[q] = random_bf16(rng, static_cast<size_t>(want[q].num_recv) * c.H);
      if (c.bias) bias[q] = random_bf16(rng, static_cast<size_t>(c.tokens[q]) * c.H);
      if (c.weights) recv_w[q] = want[q].topk_weights;
    }
    const auto want_out = ref::ht_combine(shape, routings(in), y, bias, recv_w, /*num_nodes=*/c.N);
    const int64_t T = c.tokens[r], N = want[r].num_recv;
    DeviceBuffer<uint16_t> d_y(y[r]), d_bias(bias[r]), d_out(static_cast<size_t>(T) * c.H);
    d_out.poison();
    CombineArgs ca;
    ca.y = TensorView::contiguous(d_y.get(), DType::kBF16, {N, c.H}, 0);  // unregistered: staged
    if (c.weights)
      ca.recv_topk_weights =
          TensorView::contiguous(d.recv_topk_weights.data, DType::kF32, {N, c.K}, 0);
    if (c.bias) ca.bias = TensorView::contiguous(d_bias.get(), DType::kBF16, {T, c.H}, 0);
    CombineOptions co;
    if (c.caller_out) co.out = TensorView::contiguous(d_out.get(), DType::kBF16, {T, c.H}, 0);
    CombineOutput out = comm->combine(ca, d.handle, co);
    comm->synchronize();
    if (!c.caller_out) {  // the library's output buffer: poison it and run again
      me.barrier();
      poison(out.out);
      if (out.combined_topk_weights.present()) poison(out.combined_topk_weights);
      me.barrier();
      out = comm->combine(ca, d.handle, co);
      comm->synchronize();
    }
    CHECK(out.out.shape[0] == T && out.out.shape[1] == c.H) << at << ": out " << out.out.describe();
    expect_equal(download<uint16_t>(out.out, T * c.H), want_out[r].out, at + " combine out");
    if (c.weights)
      expect_equal(download<float>(out.combined_topk_weights, T * c.K),
                   want_out[r].combined_topk_weights, at + " combined weights");
    me.barrier();  // every rank is done with this sub-case's buffers
  }
}

/// LL through the engine: six rounds (the two receive buffers alternate), each on fresh inputs
/// with a rank of no tokens and a rank of M tokens; bf16 and fp8, with and without hooks, the
/// caller's out or the library's. Every output view seen so far is poisoned between two barriers
/// before each round; every valid slot and every combine element is compared.
void ll_as_nodes(const NodeRank& me) {
  Config cfg = test_config(Mode::kLowLatency, kNodeE, kNodeK, kNodeH, kNodeTokens);
  cfg.low_latency_max_tokens = kNodeM;
  cfg.threads_per_block = 512;  // as the internode LL tests of virtual nodes
  cfg.timeout_seconds = 10.0;
  cfg.rdma_bytes = required_rdma_bytes(cfg, me.ranks, me.nodes);
  auto comm = connect_as_nodes(cfg, me);
  const int R = me.ranks, r = me.rank, E = kNodeE, K = kNodeK, H = kNodeH, M = cfg.ll_capacity();
  const int L = E / R, G = H / ref::kFp8Group;
  const int64_t slots = int64_t{L} * R * M;
  const ref::Shape shape{R, E, K, H};
  std::vector<TensorView> seen;  // every output view returned so far
  auto remember = [&](const TensorView& v) {
    if (v.present() && v.data && v.nbytes() > 0) seen.push_back(v);
  };
  DeviceBuffer<uint16_t> d_out(static_cast<size_t>(M) * H);
  for (int round = 0; round < 6; ++round) {
    const bool quantize = round % 2 == 1, hooks = round >= 4, own_out = round % 3 != 2;
    const std::string at = me.tag() + " LL round " + std::to_string(round) +
                           (quantize ? " fp8" : " bf16") + (hooks ? " hooks" : "") +
                           (own_out ? "" : " library_out");
    std::mt19937_64 rng(me.seed + 1000 + static_cast<uint64_t>(round));  // the same on every rank
    std::vector<int64_t> tokens(R);
    for (auto& t : tokens) t = std::uniform_int_distribution<int64_t>(0, M)(rng);
    tokens[round % R] = 0;
    tokens[(round + 1) % R] = M;
    const auto in = make_inputs(rng, tokens, E, K, H, Routing::kWithDrops);
    std::vector<std::vector<uint16_t>> y(R);
    std::vector<std::vector<float>> weights(R);
    std::vector<ref::Payload> payload(R);
    for (int q = 0; q < R; ++q) {
      y[q] = random_bf16(rng, static_cast<size_t>(slots) * H);
      weights[q] = in[q].weights;
      ref::Payload& pl = payload[q];
      if (quantize) {
        pl.row_bytes = H;
        pl.x.resize(static_cast<size_t>(tokens[q]) * H);
        pl.x_scales.resize(static_cast<size_t>(tokens[q]) * G);
        ref::quantize_fp8(in[q].x.data(), tokens[q], H, cfg.scale_format, pl.x.data(),
                          pl.x_scales.data());
      } else {
        pl.row_bytes = 2 * H;
        pl.x.resize(in[q].x.size() * 2);
        if (!pl.x.empty()) std::memcpy(pl.x.data(), in[q].x.data(), pl.x.size());
      }
    }
    const auto want = ref::ll_dispatch(shape, M, routings(in), payload);
    const auto want_out = ref::ll_combine(shape, M, routings(in), weights, y);
    const int64_t T = tokens[r];

    me.barrier();  // every rank's previous round is over
    for (const TensorView& v : seen) poison(v);
    d_out.poison();
    me.barrier();  // every rank has poisoned before any rank writes

    DispatchArgs a;
    a.x = in[r].x_view(H);
    a.topk_idx = in[r].idx_view(K);
    DispatchOptions o;
    o.quantize_fp8 = quantize;
    o.return_recv_hook = hooks;
    const DispatchOutput d = comm->dispatch(a, o);
    CHECK(d.hook.valid() == hooks) << at << ": hook";
    if (hooks && d.hook.valid()) d.hook();
    comm->synchronize();
    for (const TensorView* v :
         {&d.recv_x, &d.recv_x_scales, &d.recv_count, &d.recv_src_info, &d.recv_layout})
      remember(*v);

    const bool shapes_ok = d.recv_x.numel() == slots * H && d.recv_count.numel() == L &&
                           d.recv_src_info.numel() == slots &&
                           d.recv_layout.numel() == int64_t{L} * R * 2 &&
                           d.recv_x.dtype == (quantize ? DType::kFP8E4M3 : DType::kBF16) &&
                           (!quantize || d.recv_x_scales.numel() == slots * G);
    CHECK(shapes_ok) << at << ": recv_x " << d.recv_x.describe() << ", recv_x_scales "
                     << d.recv_x_scales.describe() << ", recv_count " << d.recv_count.describe()
                     << ", recv_src_info " << d.recv_src_info.describe() << ", recv_layout "
                     << d.recv_layout.describe();
    if (shapes_ok) {
      const ref::LlReceived& w = want[r];
      expect_equal(download<int32_t>(d.recv_count), w.count, at + " recv_count");
      expect_equal(download<int32_t>(d.recv_layout), w.layout, at + " recv_layout");
      const auto src = download<int32_t>(d.recv_src_info);
      const size_t row = quantize ? H : 2 * H;
      const auto x = download<uint8_t>(d.recv_x, static_cast<int64_t>(d.recv_x.nbytes()));
      std::vector<float> scales;
      if (quantize) scales = download<float>(d.recv_x_scales);
      int64_t valid = 0, bad_src = 0, bad_x = 0, bad_scale = 0, first = -1;
      for (int64_t s = 0; s < slots; ++s) {
        if (!w.slot_valid[s]) continue;
        ++valid;
        const bool src_bad = src[s] != w.src_token[s];
        const bool x_bad = std::memcmp(&x[s * row], &w.x[s * row], row) != 0;
        const bool scale_bad =
            quantize && std::memcmp(&scales[s * G], &w.x_scales[s * G], G * sizeof(float)) != 0;
        bad_src += src_bad;
        bad_x += x_bad;
        bad_scale += scale_bad;
        if ((src_bad || x_bad || scale_bad) && first < 0) first = s;
      }
      CHECK(valid > 0 || std::all_of(w.count.begin(), w.count.end(), [](int v) { return v == 0; }))
          << at << ": no valid slot";
      CHECK(bad_src == 0 && bad_x == 0 && bad_scale == 0)
          << at << ": of " << valid << " valid slots, " << bad_src << " recv_src_info, " << bad_x
          << " recv_x, " << bad_scale << " recv_x_scales differ (first: slot " << first << ")";
    }

    DeviceBuffer<uint16_t> d_y(y[r]);
    CombineArgs ca;
    ca.y = TensorView::contiguous(d_y.get(), DType::kBF16, {L, int64_t{R} * M, H}, 0);
    ca.topk_weights = in[r].weights_view(K);
    CombineOptions co;
    co.return_recv_hook = hooks;
    if (own_out) co.out = TensorView::contiguous(d_out.get(), DType::kBF16, {T, H}, 0);
    const CombineOutput out = comm->combine(ca, d.handle, co);
    if (hooks && out.hook.valid()) out.hook();
    comm->synchronize();
    if (!own_out) remember(out.out);
    CHECK(out.out.dtype == DType::kBF16 && out.out.ndim == 2 && out.out.shape[0] == T &&
          out.out.shape[1] == H)
        << at << ": combine out " << out.out.describe();
    if (own_out && T > 0) CHECK(out.out.data == d_out.get()) << at << ": out is not the caller's";
    expect_equal(download<uint16_t>(out.out, T * H), want_out[r], at + " combine out");
  }
  me.barrier();
}

/// Forks `ranks` children running body(rank, to_parent, from_parent) and relays their
/// allgather_via_parent calls until every child has closed its pipe; returns their exit codes and
/// the number of relayed rounds.
template <typename Body>
std::vector<int> run_relayed_children(int ranks, const Body& body, int* rounds) {
  // A child that died leaves a broken pipe: the parent's write then fails instead of killing it.
  const auto old_sigpipe = std::signal(SIGPIPE, SIG_IGN);
  std::vector<std::array<int, 2>> up(ranks), down(ranks);
  std::vector<pid_t> pid(ranks);
  std::fflush(stdout);  // else a child's exit would print the parent's buffered lines again
  std::fflush(stderr);
  for (int r = 0; r < ranks; ++r) {
    if (pipe(up[r].data()) != 0 || pipe(down[r].data()) != 0)
      throw std::runtime_error("pipe failed");
    pid[r] = fork();
    if (pid[r] == 0) {
      for (int q = 0; q < r; ++q) {  // the earlier children's parent ends
        close(up[q][0]);
        close(down[q][1]);
      }
      close(up[r][0]);
      close(down[r][1]);
      int rc = 2;
      try {
        rc = body(r, up[r][1], down[r][0]);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(stdout);
      std::fflush(stderr);
      _exit(rc);
    }
    close(up[r][1]);
    close(down[r][0]);
  }
  *rounds = 0;
  for (bool open = true; open;) {
    std::vector<uint8_t> all;
    for (int r = 0; r < ranks && open; ++r) {
      uint32_t n = 0;
      open = read_all(up[r][0], &n, sizeof(n));
      std::vector<uint8_t> m(open ? n : 0);
      open = open && read_all(up[r][0], m.data(), m.size());
      all.insert(all.end(), m.begin(), m.end());
    }
    const uint32_t total = static_cast<uint32_t>(all.size());
    for (int r = 0; r < ranks && open; ++r)
      open = write_all(down[r][1], &total, sizeof(total)) &&
             write_all(down[r][1], all.data(), all.size());
    if (open) ++*rounds;
  }
  for (int r = 0; r < ranks; ++r) {
    close(up[r][0]);
    close(down[r][1]);
  }
  std::vector<int> rcs(ranks);
  for (int r = 0; r < ranks; ++r) {
    int status = 0;
    waitpid(pid[r], &status, 0);
    rcs[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::signal(SIGPIPE, old_sigpipe);
  return rcs;
}

}  // namespace

TEST_CASE(
    "processes declared as nodes (2x1, 2x2): internode HT and LL with data, vs the reference") {
  const uint64_t s = seed();
  struct Layout {
    int ranks, nodes;
  };
  for (const Layout lay : {Layout{2, 2}, Layout{4, 2}}) {
    int rounds = 0;
    const std::vector<int> rcs = run_relayed_children(
        lay.ranks,
        [&](int rank, int to_parent, int from_parent) {
          if (cuda_device_count() == 0) return kExitNoGpu;
          const int failures_before = state().failures_in_case;
          const NodeRank me{rank, lay.ranks, lay.nodes, to_parent, from_parent, s};
          ht_as_nodes(me);
          ll_as_nodes(me);
          return state().failures_in_case == failures_before ? 0 : 1;
        },
        &rounds);
    if (std::all_of(rcs.begin(), rcs.end(), [](int rc) { return rc == kExitNoGpu; })) {
      skip("no CUDA device");
      return;
    }
    for (int r = 0; r < lay.ranks; ++r)
      CHECK_EQ(rcs[r], 0) << lay.nodes << "x" << lay.ranks / lay.nodes << " processes, rank " << r
                          << " (1: outputs differ from the reference, see above; 2: error)";
    CHECK(rounds > 0) << "no allgather was relayed";
  }
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
