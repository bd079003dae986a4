// A group of separate processes on one GPU: peers' buffers mapped with CUDA IPC, handles carried
// over pipes by the parent (any launcher would do). Each child checks its own rank's results
// against the host reference; the parent checks every child's exit status.
// The parent never initialises CUDA (fork after CUDA initialisation is unsafe).
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <chrono>
#include <random>

#include "gpu/ep_fixture.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

constexpr int kRanks = 2;
constexpr int kExitNoGpu = 77;
constexpr int E = 16, K = 4, H = 256, kMaxTokens = 64;

bool write_all(int fd, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  while (n) {
    const ssize_t w = write(fd, b, n);
    if (w <= 0) return false;
    b += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}
bool read_all(int fd, void* p, size_t n) {
  uint8_t* b = static_cast<uint8_t*>(p);
  while (n) {
    const ssize_t r = read(fd, b, n);
    if (r <= 0) return false;
    b += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

/// Body of rank `rank`: returns 0 when every output matched the reference.
int run_rank(int rank, int to_parent, int from_parent, uint64_t seed) {
  if (cuda_device_count() == 0) return kExitNoGpu;
  Config cfg = test_config(Mode::kAuto, E, K, H, kMaxTokens);
  cfg.auto_low_latency_max_tokens = 32;  // T <= 32 takes LL, larger T takes HT
  ProcessGroupBuilder builder(cfg, rank, kRanks, 0);
  const std::vector<uint8_t> mine = builder.local_handle();
  std::vector<uint8_t> all(ProcessGroupBuilder::handle_size() * kRanks);
  if (!write_all(to_parent, mine.data(), mine.size()) ||
      !read_all(from_parent, all.data(), all.size()))
    return 3;
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
  int up[kRanks][2], down[kRanks][2];
  pid_t pid[kRanks];
  for (int r = 0; r < kRanks; ++r) {
    if (pipe(up[r]) != 0 || pipe(down[r]) != 0) throw std::runtime_error("pipe failed");
    pid[r] = fork();
    if (pid[r] == 0) {
      close(up[r][0]);
      close(down[r][1]);
      int rc = 2;
      try {
        rc = run_rank(r, up[r][1], down[r][0], s);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    // The parent keeps only its ends, so that a child's exit ends the parent's reads.
    close(up[r][1]);
    close(down[r][0]);
  }
  // Carry the handles: gather from every child, then send all to every child.
  std::vector<uint8_t> all;
  bool carried = true;
  for (int r = 0; r < kRanks && carried; ++r) {
    std::vector<uint8_t> h(ProcessGroupBuilder::handle_size());
    carried = read_all(up[r][0], h.data(), h.size());
    all.insert(all.end(), h.begin(), h.end());
  }
  for (int r = 0; r < kRanks && carried; ++r)
    carried = write_all(down[r][1], all.data(), all.size());
  for (int r = 0; r < kRanks; ++r) {
    close(up[r][0]);
    close(down[r][1]);
  }
  int no_gpu = 0;
  for (int r = 0; r < kRanks; ++r) {
    int status = 0;
    waitpid(pid[r], &status, 0);
    const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (rc == kExitNoGpu) {
      ++no_gpu;
      continue;
    }
    CHECK_EQ(rc, 0) << "rank " << r << " (1: outputs differ from the reference; 2: error; 3: pipe)";
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
  const std::vector<uint8_t> mine = builder.local_handle();
  std::vector<uint8_t> all(ProcessGroupBuilder::handle_size() * ranks);
  if (!write_all(to_parent, mine.data(), mine.size()) ||
      !read_all(from_parent, all.data(), all.size()))
    throw std::runtime_error("pipe to the parent broke");
  return builder.connect(all);
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
  const std::vector<uint8_t> mine = builder.local_handle();
  std::vector<uint8_t> all(ProcessGroupBuilder::handle_size() * kRanks);
  if (!write_all(to_parent, mine.data(), mine.size()) ||
      !read_all(from_parent, all.data(), all.size()))
    return 3;
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

/// Forks kRanks children running body(rank, to_parent, from_parent), carries their handles, and
/// returns their exit codes (kExitNoGpu where there is no device).
template <typename Body>
std::vector<int> run_children(const Body& body, bool* carried) {
  int up[kRanks][2], down[kRanks][2];
  pid_t pid[kRanks];
  for (int r = 0; r < kRanks; ++r) {
    if (pipe(up[r]) != 0 || pipe(down[r]) != 0) throw std::runtime_error("pipe failed");
    pid[r] = fork();
    if (pid[r] == 0) {
      close(up[r][0]);
      close(down[r][1]);
      int rc = 2;
      try {
        rc = body(r, up[r][1], down[r][0]);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", r, e.what());
      }
      std::fflush(stdout);
      _exit(rc);
    }
    close(up[r][1]);
    close(down[r][0]);
  }
  std::vector<uint8_t> all;
  *carried = true;
  for (int r = 0; r < kRanks && *carried; ++r) {
    std::vector<uint8_t> h(ProcessGroupBuilder::handle_size());
    *carried = read_all(up[r][0], h.data(), h.size());
    all.insert(all.end(), h.begin(), h.end());
  }
  for (int r = 0; r < kRanks && *carried; ++r)
    *carried = write_all(down[r][1], all.data(), all.size());
  for (int r = 0; r < kRanks; ++r) {
    close(up[r][0]);
    close(down[r][1]);
  }
  std::vector<int> rcs(kRanks);
  for (int r = 0; r < kRanks; ++r) {
    int status = 0;
    waitpid(pid[r], &status, 0);
    rcs[r] = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  return rcs;
}

}  // namespace

TEST_CASE("processes declared as two nodes (host-id override): connect() sees the nodes") {
  for (bool with_window : {true, false}) {
    bool carried = false;
    const std::vector<int> rcs = run_children(
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

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
