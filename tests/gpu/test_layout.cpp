// Routing layout on the GPU against the host reference, the argument checks of the calls, and
// what a rank sees when a peer never makes the call.
#include <random>

#include "gpu/ep_fixture.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

constexpr int kHidden = 128;  // layout does not read x: keep the buffers small
constexpr int kMaxTokens = 4096;

/// Runs get_layout on every rank (rank after rank: it never waits on the host) and compares
/// every output with ref::layout. Outputs are poisoned first.
void check_layout(VirtualGroup& group, const std::vector<RankInput>& in, int E, int K, bool i32_idx,
                  const std::string& what) {
  const int R = group.size(), L = E / R, N = group.num_nodes(), G = R / N;
  // A first run tells where each rank's outputs live; poison them all, run again, check.
  std::vector<Layout> out(R);
  for (int r = 0; r < R; ++r) out[r] = group[r].get_layout(in[r].idx_view(K, i32_idx));
  group.synchronize();
  for (int r = 0; r < R; ++r) {
    poison(out[r].num_tokens_per_rank);
    poison(out[r].num_tokens_per_expert);
    poison(out[r].is_token_in_rank, static_cast<int64_t>(kMaxTokens) * R);
    poison(out[r].num_recv_tokens_per_rank);
    poison(out[r].num_recv_tokens_per_expert);
    if (N > 1) poison(out[r].num_tokens_per_node);
  }
  for (int r = 0; r < R; ++r) out[r] = group[r].get_layout(in[r].idx_view(K, i32_idx));
  group.synchronize();

  ref::Shape shape{R, E, K, kHidden};
  const auto want = ref::layout(shape, routings(in));
  for (int r = 0; r < R; ++r) {
    std::string first;
    CHECK(count_mismatches(download<int32_t>(out[r].num_tokens_per_rank),
                           want[r].num_tokens_per_rank, &first) == 0)
        << what << " rank " << r << " num_tokens_per_rank " << first;
    CHECK(count_mismatches(download<int32_t>(out[r].num_tokens_per_expert),
                           want[r].num_tokens_per_expert, &first) == 0)
        << what << " rank " << r << " num_tokens_per_expert " << first;
    CHECK(count_mismatches(download<uint8_t>(out[r].is_token_in_rank), want[r].is_token_in_rank,
                           &first) == 0)
        << what << " rank " << r << " is_token_in_rank " << first;
    CHECK(count_mismatches(download<int32_t>(out[r].num_recv_tokens_per_rank),
                           want[r].num_recv_tokens_per_rank, &first) == 0)
        << what << " rank " << r << " num_recv_tokens_per_rank " << first;
    CHECK(count_mismatches(download<int32_t>(out[r].num_recv_tokens_per_expert),
                           want[r].num_recv_tokens_per_expert, &first) == 0)
        << what << " rank " << r << " num_recv_tokens_per_expert " << first << " (L=" << L << ")";
    if (N == 1) {
      CHECK(!out[r].num_tokens_per_node.present()) << what << ": per-node counts on one node";
      continue;
    }
    // Tokens bound for node n: those with a destination among its ranks.
    const int64_t T = in[r].routing.num_tokens;
    std::vector<int32_t> per_node(N, 0);
    for (int64_t t = 0; t < T; ++t)
      for (int n = 0; n < N; ++n) {
        bool any = false;
        for (int d = n * G; d < (n + 1) * G; ++d) any = any || want[r].is_token_in_rank[t * R + d];
        per_node[n] += any ? 1 : 0;
      }
    CHECK(count_mismatches(download<int32_t>(out[r].num_tokens_per_node), per_node, &first) == 0)
        << what << " rank " << r << " num_tokens_per_node " << first;
  }
}

}  // namespace

TEST_CASE("layout matches the reference over R, E, K, T") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());
  const std::vector<int64_t> token_counts = {0, 1, 127, 4096};
  for (int R : {1, 2, 4, 8})
    for (int E : {8, 64, 256})
      for (int K : {1, 2, 8}) {
        if (K > E) continue;
        VirtualGroup group(test_config(Mode::kHighThroughput, E, K, kHidden, kMaxTokens), R);
        int variant = 0;
        for (int64_t T : token_counts) {
          std::vector<int64_t> tokens(R, T);
          auto in = make_inputs(rng, tokens, E, K, kHidden, Routing::kUniform);
          check_layout(group, in, E, K, (variant++ % 2) == 1,
                       "R=" + std::to_string(R) + " E=" + std::to_string(E) +
                           " K=" + std::to_string(K) + " T=" + std::to_string(T));
        }
        // Mixed T across ranks, with -1 entries, and everything on one expert.
        std::vector<int64_t> mixed(R);
        for (int r = 0; r < R; ++r) mixed[r] = token_counts[r % token_counts.size()];
        for (Routing kind : {Routing::kWithDrops, Routing::kOneExpert, Routing::kFirstRanksOnly}) {
          auto in = make_inputs(rng, mixed, E, K, kHidden, kind);
          check_layout(group, in, E, K, false,
                       "R=" + std::to_string(R) + " E=" + std::to_string(E) +
                           " K=" + std::to_string(K) + " mixed T, " + routing_name(kind));
        }
      }
}

TEST_CASE("layout on odd rank counts") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 1);
  for (int R : {3, 5, 7}) {
    const int E = 7 * 5 * 3 * 2;  // divisible by 3, 5, 7
    VirtualGroup group(test_config(Mode::kHighThroughput, E, 8, kHidden, kMaxTokens), R);
    std::vector<int64_t> tokens(R);
    for (int r = 0; r < R; ++r) tokens[r] = (r * 997) % 1500;
    auto in = make_inputs(rng, tokens, E, 8, kHidden, Routing::kWithDrops);
    check_layout(group, in, E, 8, false, "R=" + std::to_string(R));
  }
}

TEST_CASE("get_layout on low-latency and auto communicators (no receive capacity involved)") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 2);
  for (Mode mode : {Mode::kLowLatency, Mode::kAuto}) {
    const int R = 4, E = 32, K = 4;
    Config cfg = test_config(mode, E, K, kHidden, kMaxTokens);
    cfg.low_latency_max_tokens = 64;  // small LL buffers; get_layout takes up to kMaxTokens
    VirtualGroup group(cfg, R);
    for (int64_t T : {int64_t{42}, int64_t{kMaxTokens}}) {
      auto in = make_inputs(rng, std::vector<int64_t>(R, T), E, K, kHidden, Routing::kWithDrops);
      check_layout(group, in, E, K, T == 42,
                   std::string(mode_name(mode)) + " T=" + std::to_string(T));
    }
  }
}

TEST_CASE("get_layout across virtual nodes: the counts through the RDMA engine, per-node counts") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 3);
  struct Shape {
    int R, N;
    Mode mode;
  };
  for (Shape sh : {Shape{4, 2, Mode::kHighThroughput}, Shape{8, 4, Mode::kHighThroughput},
                   Shape{8, 8, Mode::kLowLatency}, Shape{6, 3, Mode::kAuto}}) {
    const int E = 48, K = 6;
    Config cfg = test_config(sh.mode, E, K, kHidden, 1024);
    cfg.low_latency_max_tokens = 64;
    cfg.num_sms = 8;
    cfg.rdma_bytes = required_rdma_bytes(cfg, sh.R, sh.N);
    VirtualGroup group(cfg, sh.R, {0}, sh.N);
    const std::string name = std::to_string(sh.N) + "x" + std::to_string(sh.R / sh.N) + " " +
                             mode_name(sh.mode);
    std::vector<int64_t> tokens(sh.R);
    for (int r = 0; r < sh.R; ++r) tokens[r] = r == 1 ? 0 : (r * 389) % 1024 + 1;
    for (Routing kind : {Routing::kUniform, Routing::kWithDrops, Routing::kFirstRanksOnly}) {
      auto in = make_inputs(rng, tokens, E, K, kHidden, kind);
      check_layout(group, in, E, K, kind == Routing::kWithDrops,
                   name + " " + routing_name(kind));
    }
  }
}

TEST_CASE("bad topk_idx values are reported with rank, token and value") {
  REQUIRE_GPU();
  const int R = 2, E = 8, K = 2;
  VirtualGroup group(test_config(Mode::kHighThroughput, E, K, kHidden, 64), R);
  std::mt19937_64 rng(seed() + 2);
  for (int bad_case = 0; bad_case < 3; ++bad_case) {
    auto in = make_inputs(rng, {16, 16}, E, K, kHidden, Routing::kUniform);
    auto idx = in[1].routing.topk_idx;
    std::string expect;
    if (bad_case == 0) {
      idx[5 * K + 1] = E;
      expect = "names expert 8";
    }
    if (bad_case == 1) {
      idx[3 * K + 0] = -2;
      expect = "names expert -2";
    }
    if (bad_case == 2) {
      idx[7 * K + 1] = idx[7 * K + 0];
      expect = "twice";
    }
    in[1].d_idx.upload(idx);
    group[0].get_layout(in[0].idx_view(K));
    group[1].get_layout(in[1].idx_view(K));
    group[0].synchronize();
    CHECK_THROWS(group[1].synchronize(), InvalidArgument, expect);
    // The communicator stays usable after bad input.
    in[1].d_idx.upload(in[1].routing.topk_idx);
    group[0].get_layout(in[0].idx_view(K));
    group[1].get_layout(in[1].idx_view(K));
    group.synchronize();
  }
}

TEST_CASE("wrong shapes, dtypes, devices and sizes are rejected by name") {
  REQUIRE_GPU();
  const int R = 2, E = 8, K = 2, H = 256;
  VirtualGroup group(test_config(Mode::kHighThroughput, E, K, H, 64), R);
  DeviceBuffer<uint16_t> x(65 * H);
  DeviceBuffer<int64_t> idx(65 * K);
  DeviceBuffer<float> f(65 * K);
  DispatchArgs a;
  a.x = x.view(DType::kBF16, {16, H});
  a.topk_idx = idx.view(DType::kI64, {16, K + 1});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "topk_idx: expected [T=16, 2]");
  a.topk_idx = f.view(DType::kF32, {16, K});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "topk_idx");
  a.topk_idx = idx.view(DType::kI64, {16, K});
  a.x = x.view(DType::kF32, {16, H / 2});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "x: expected");
  a.x = x.view(DType::kBF16, {65, H});
  a.topk_idx = idx.view(DType::kI64, {65, K});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "max_tokens_per_rank");
  std::vector<uint16_t> host(16 * H);
  a.x = TensorView::contiguous(host.data(), DType::kBF16, {16, H}, kHostDevice);
  a.topk_idx = idx.view(DType::kI64, {16, K});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "on host");
  a.x = x.view(DType::kBF16, {16, H});
  a.topk_weights = f.view(DType::kF32, {16, K + 1});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "topk_weights");
  a.topk_weights = {};
  a.x_scales = f.view(DType::kF32, {16, 2});
  CHECK_THROWS(group[0].dispatch(a), InvalidArgument, "x_scales: expected absent");
  CHECK_THROWS(group[0].combine({}, Handle{}), InvalidArgument, "handle");
  DispatchOptions bad_stream;
  bad_stream.stream = group[1].stream();
  a.x_scales = {};
  CHECK_THROWS(group[0].dispatch(a, bad_stream), InvalidArgument, "stream");
}

TEST_CASE("a peer that never calls: the call ends in TimeoutError naming rank, peer and phase") {
  REQUIRE_GPU();
  const int R = 2, E = 8, K = 2, H = 128;
  std::mt19937_64 rng(seed() + 3);
  const auto in = make_inputs(rng, {16, 16}, E, K, H, Routing::kUniform);
  struct StallCase {
    Mode mode;
    bool layout_only;
    const char* phase;
  };
  for (const StallCase& c : {StallCase{Mode::kHighThroughput, true, "count exchange"},
                             StallCase{Mode::kHighThroughput, false, "count exchange"},
                             StallCase{Mode::kLowLatency, false, "arrival"}}) {
    Config cfg = test_config(c.mode, E, K, H, 64);
    cfg.timeout_seconds = 0.5;
    VirtualGroup group(cfg, R);
    // Only rank 0 calls; rank 1 never does.
    if (c.layout_only) {
      group[0].get_layout(in[0].idx_view(K));
    } else {
      DispatchArgs a;
      a.x = in[0].x_view(H);
      a.topk_idx = in[0].idx_view(K);
      a.topk_weights = in[0].weights_view(K);
      DispatchOptions o;
      o.sizing = Sizing::kWorstCase;  // exact sizing would wait on the host for the counts
      group[0].dispatch(a, o);
    }
    const std::string what = std::string(c.layout_only ? "get_layout" : "dispatch") + " (" +
                             (c.mode == Mode::kLowLatency ? "LL" : "HT") + ")";
    try {
      group[0].synchronize();
      CHECK(false) << what << ": no error although rank 1 never called";
    } catch (const TimeoutError& e) {
      const std::string m = e.what();
      CHECK(m.find("rank 0") != std::string::npos && m.find("peer 1") != std::string::npos &&
            m.find(c.phase) != std::string::npos)
          << what << ": " << m;
    }
  }
}

TEST_CASE("HT combine with a peer that never calls: TimeoutError, and the process goes on") {
  REQUIRE_GPU();
  const int R = 2, E = 8, K = 2, H = 128;
  std::mt19937_64 rng(seed() + 4);
  const auto in = make_inputs(rng, {16, 16}, E, K, H, Routing::kUniform);
  Config cfg = test_config(Mode::kHighThroughput, E, K, H, 64);
  cfg.timeout_seconds = 0.5;
  {
    VirtualGroup group(cfg, R);
    std::vector<DispatchOutput> out(R);
    group.parallel_for([&](int r) {
      DispatchArgs a;
      a.x = in[r].x_view(H);
      a.topk_idx = in[r].idx_view(K);
      out[r] = group[r].dispatch(a);
    });
    group.synchronize();
    // The group's first combine, on rank 0 only: rank 1 never publishes its outputs (its slot
    // is still empty), so rank 0 must give up without reading it.
    DeviceBuffer<uint16_t> y(static_cast<size_t>(out[0].num_recv_tokens) * H + 8);
    CombineArgs a;
    a.y = y.view(DType::kBF16, {out[0].num_recv_tokens, H});
    group[0].combine(a, out[0].handle);
    try {
      group[0].synchronize();
      CHECK(false) << "combine: no error although rank 1 never called";
    } catch (const TimeoutError& e) {
      const std::string m = e.what();
      CHECK(m.find("rank 0") != std::string::npos && m.find("peer 1") != std::string::npos &&
            m.find("combine") != std::string::npos)
          << m;
    }
  }
  // The CUDA context survived: a new group works.
  VirtualGroup group(test_config(Mode::kHighThroughput, E, K, H, 64), R);
  for (int r = 0; r < R; ++r) group[r].get_layout(in[r].idx_view(K));
  group.synchronize();
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST_CASE("one launch for the group refuses the HT path before any rank's state changes") {
  REQUIRE_GPU();
  const int R = 2, E = 8, K = 2, H = 128;
  Config cfg = test_config(Mode::kAuto, E, K, H, 64);
  cfg.auto_low_latency_max_tokens = 4;  // 16 tokens take the HT path
  VirtualGroup group(cfg, R);
  std::mt19937_64 rng(seed() + 4);
  const auto in = make_inputs(rng, {16, 16}, E, K, H, Routing::kUniform);
  std::vector<DispatchArgs> args(R);
  for (int r = 0; r < R; ++r) {
    args[r].x = in[r].x_view(H);
    args[r].topk_idx = in[r].idx_view(K);
  }
  DispatchOptions worst;
  worst.sizing = Sizing::kWorstCase;
  CHECK_THROWS(group.dispatch_all(args, worst), Unsupported, "16 tokens takes the high-throughput");
  std::vector<DispatchOutput> out(R);
  for (int r = 0; r < R; ++r) out[r] = group[r].dispatch(args[r], worst);
  group.synchronize();
  DispatchOptions cached = worst;
  cached.previous_handle = &out[0].handle;
  CHECK_THROWS(group.dispatch_all(args, cached), Unsupported, "a cached dispatch");
  // Had a refused call launched anything on one rank, the ranks' calls would no longer pair up.
  for (int r = 0; r < R; ++r) out[r] = group[r].dispatch(args[r], worst);
  group.synchronize();
}

TEST_CASE("an SM budget that cannot be co-resident is refused") {
  REQUIRE_GPU();
  Config c = test_config(Mode::kHighThroughput, 8, 2, 128, 64);
  c.num_sms = device_sm_count(0);
  CHECK_THROWS(VirtualGroup(c, 2), InvalidArgument, "Config.num_sms");
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
