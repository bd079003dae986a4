// The internode (two-level) high-throughput path on virtual nodes of one GPU against the host
// reference: every dispatch output compared bit for bit with ref::ht_dispatch (the same outputs
// and order as intranode), and combine with ref::ht_combine(..., num_nodes) (the per-node partial
// sums rounded to bf16 before they cross nodes). The seed is printed by the harness.
#include <random>

#include "gpu/ep_fixture.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

enum class Payload { kBf16, kFp8Passthrough, kFp8Quantize };

struct InCase {
  int R = 4, N = 2, E = 16, K = 4, H = 256;
  int max_tokens = 160;  // more than two chunks of messages per node
  std::vector<int64_t> tokens;  // per rank
  Routing routing = Routing::kUniform;
  Payload payload = Payload::kBf16;
  ScaleFormat scales = ScaleFormat::kFloat32;
  int alignment = 1;
  bool weights = true;
  bool bias = false;
  bool caller_out = false;
  Sizing sizing = Sizing::kExact;
  bool check_cached = true;

  std::string name() const {
    std::string s = std::to_string(N) + "x" + std::to_string(R / N) + " nodes E=" +
                    std::to_string(E) + " K=" + std::to_string(K) + " H=" + std::to_string(H) +
                    " " + routing_name(routing);
    s += payload == Payload::kBf16             ? " bf16"
         : payload == Payload::kFp8Passthrough ? " fp8-pass"
                                               : " fp8-quant";
    if (payload != Payload::kBf16) s += scales == ScaleFormat::kPowerOfTwo ? "/pow2" : "/f32";
    s += sizing == Sizing::kExact ? " exact" : " worst-case";
    return s;
  }
};

Config case_config(const InCase& c) {
  Config cfg = test_config(Mode::kHighThroughput, c.E, c.K, c.H, c.max_tokens);
  cfg.expert_alignment = c.alignment;
  cfg.scale_format = c.scales;
  cfg.num_sms = c.R > 8 ? 8 : 4;  // every rank's blocks co-resident on one GPU
  cfg.rdma_bytes = required_rdma_bytes(cfg, c.R, c.N);
  return cfg;
}

struct SendSide {
  std::vector<ref::Payload> payload;
  std::vector<DeviceBuffer<uint8_t>> fp8_x;
  std::vector<DeviceBuffer<float>> fp8_scales;
};

SendSide make_send_side(const InCase& c, const std::vector<RankInput>& in) {
  SendSide s;
  const int G = c.H / 128;
  for (int r = 0; r < c.R; ++r) {
    const int64_t T = in[r].routing.num_tokens;
    ref::Payload p;
    if (c.payload == Payload::kBf16) {
      p.row_bytes = c.H * 2;
      p.x.resize(static_cast<size_t>(T) * c.H * 2);
      std::memcpy(p.x.data(), in[r].x.data(), p.x.size());
    } else {
      p.row_bytes = c.H;
      p.x.resize(static_cast<size_t>(T) * c.H);
      p.x_scales.resize(static_cast<size_t>(T) * G);
      ref::quantize_fp8(in[r].x.data(), T, c.H, c.scales, p.x.data(), p.x_scales.data());
    }
    if (c.weights) p.topk_weights = in[r].weights;
    if (c.payload == Payload::kFp8Passthrough) {
      s.fp8_x.emplace_back(p.x);
      s.fp8_scales.emplace_back(p.x_scales);
    }
    s.payload.push_back(std::move(p));
  }
  return s;
}

DispatchArgs dispatch_args(const InCase& c, const std::vector<RankInput>& in, const SendSide& s,
                           int r) {
  DispatchArgs a;
  const int64_t T = in[r].routing.num_tokens;
  if (c.payload == Payload::kFp8Passthrough) {
    a.x = s.fp8_x[r].view(DType::kFP8E4M3, {T, c.H});
    a.x_scales = s.fp8_scales[r].view(DType::kF32, {T, c.H / 128});
  } else {
    a.x = in[r].x_view(c.H);
  }
  a.topk_idx = in[r].idx_view(c.K);
  if (c.weights) a.topk_weights = in[r].weights_view(c.K);
  return a;
}

std::vector<DispatchOutput> run_dispatch(VirtualGroup& group, const InCase& c,
                                         const std::vector<RankInput>& in, const SendSide& s,
                                         const std::vector<Handle>* cached = nullptr) {
  std::vector<DispatchOutput> out(c.R);
  group.parallel_for([&](int r) {
    DispatchOptions o;
    o.sizing = c.sizing;
    o.quantize_fp8 = c.payload == Payload::kFp8Quantize;
    if (cached) o.previous_handle = &(*cached)[r];
    out[r] = group[r].dispatch(dispatch_args(c, in, s, r), o);
  });
  group.synchronize();
  return out;
}

/// Poisons what a dispatch writes (the handle's summary only before a fresh dispatch).
void poison_receive_buffers(const InCase& c, const std::vector<DispatchOutput>& out,
                            bool handle_too = true) {
  const int64_t cap = static_cast<int64_t>(c.R) * c.max_tokens;
  const int G = c.H / 128;
  for (const auto& o : out) {
    poison(o.recv_x, cap * c.H * (o.recv_x.dtype == DType::kBF16 ? 2 : 1));
    if (o.recv_x_scales.present()) poison(o.recv_x_scales, cap * G * 4);
    poison(o.recv_topk_idx, cap * c.K * 8);
    if (o.recv_topk_weights.present()) poison(o.recv_topk_weights, cap * c.K * 4);
    poison(o.recv_src_token, cap * 4);
    if (!handle_too) continue;
    poison(o.recv_rank_prefix);
    poison(o.num_recv_tokens_per_expert);
    poison(o.num_recv_tokens_device);
  }
}

template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  std::string first;
  const int64_t bad = count_mismatches(got, want, &first);
  CHECK(bad == 0) << what << ": " << bad << " of " << want.size() << " differ, first " << first;
}

void verify_dispatch(const InCase& c, const std::vector<DispatchOutput>& out,
                     const std::vector<ref::HtReceived>& want, const std::string& tag) {
  const int G = c.H / 128;
  for (int r = 0; r < c.R; ++r) {
    const auto& o = out[r];
    const auto& w = want[r];
    const std::string at = tag + " rank " + std::to_string(r);
    int64_t n = o.num_recv_tokens;
    const int64_t n_dev = download<int32_t>(o.num_recv_tokens_device)[0];
    if (c.sizing == Sizing::kExact) {
      CHECK_EQ(n, w.num_recv) << at;
      CHECK_EQ(o.recv_x.shape[0], w.num_recv) << at;
      CHECK(o.num_recv_tokens_per_expert_host ==
            std::vector<int>(w.num_recv_tokens_per_expert.begin(),
                             w.num_recv_tokens_per_expert.end()))
          << at << " host per-expert counts";
    } else {
      CHECK_EQ(n, -1) << at;
      n = n_dev;
    }
    CHECK_EQ(n_dev, w.num_recv) << at;
    if (n != w.num_recv) continue;
    const int row_bytes = c.payload == Payload::kBf16 ? c.H * 2 : c.H;
    expect_equal(download<uint8_t>(o.recv_x, n * row_bytes), w.x, at + " recv_x");
    if (c.payload != Payload::kBf16)
      expect_equal(download<float>(o.recv_x_scales, n * G), w.x_scales, at + " recv_x_scales");
    expect_equal(download<int64_t>(o.recv_topk_idx, n * c.K), w.topk_idx, at + " recv_topk_idx");
    if (c.weights)
      expect_equal(download<float>(o.recv_topk_weights, n * c.K), w.topk_weights,
                   at + " recv_topk_weights");
    expect_equal(download<int32_t>(o.recv_src_token, n), w.src_token, at + " recv_src_token");
    expect_equal(download<int32_t>(o.recv_rank_prefix), w.rank_prefix, at + " recv_rank_prefix");
    expect_equal(download<int32_t>(o.num_recv_tokens_per_expert), w.num_recv_tokens_per_expert,
                 at + " num_recv_tokens_per_expert");
  }
}

/// Combine of random expert outputs (twice when the library owns the output: poisoned between),
/// compared with the two-level reference sum.
void check_combine(VirtualGroup& group, const InCase& c, std::mt19937_64& rng,
                   const std::vector<RankInput>& in, const std::vector<DispatchOutput>& disp,
                   const std::vector<ref::HtReceived>& want_disp, const std::string& tag) {
  std::vector<std::vector<uint16_t>> y(c.R), bias(c.R);
  std::vector<std::vector<float>> recv_w(c.R);
  std::vector<DeviceBuffer<uint16_t>> d_y, d_bias, d_out;
  for (int r = 0; r < c.R; ++r) {
    y[r] = random_bf16(rng, static_cast<size_t>(want_disp[r].num_recv) * c.H);
    d_y.emplace_back(y[r]);
    if (c.bias) {
      bias[r] = random_bf16(rng, static_cast<size_t>(in[r].routing.num_tokens) * c.H);
      d_bias.emplace_back(bias[r]);
    }
    if (c.weights) recv_w[r] = want_disp[r].topk_weights;
    d_out.emplace_back(static_cast<size_t>(in[r].routing.num_tokens) * c.H);
    d_out.back().poison();
  }
  std::vector<CombineOutput> out(c.R);
  auto run = [&]() {
    for (int r = 0; r < c.R; ++r) {
      const int64_t T = in[r].routing.num_tokens, N = want_disp[r].num_recv;
      CombineArgs a;
      a.y = d_y[r].view(DType::kBF16, {N, c.H});
      if (c.weights)
        a.recv_topk_weights =
            TensorView::contiguous(disp[r].recv_topk_weights.data, DType::kF32, {N, c.K}, 0);
      if (c.bias) a.bias = d_bias[r].view(DType::kBF16, {T, c.H});
      CombineOptions o;
      if (c.caller_out) o.out = d_out[r].view(DType::kBF16, {T, c.H});
      out[r] = group[r].combine(a, disp[r].handle, o);  // never waits on the host
    }
    group.synchronize();
  };
  run();
  if (!c.caller_out) {  // poison the library's output buffers and run again
    for (int r = 0; r < c.R; ++r) {
      poison(out[r].out);
      if (out[r].combined_topk_weights.present()) poison(out[r].combined_topk_weights);
    }
    run();
  }
  ref::Shape shape{c.R, c.E, c.K, c.H};
  const auto want = ref::ht_combine(shape, routings(in), y,
                                    c.bias ? bias : std::vector<std::vector<uint16_t>>{},
                                    c.weights ? recv_w : std::vector<std::vector<float>>{}, c.N);
  for (int r = 0; r < c.R; ++r) {
    const std::string at = tag + " rank " + std::to_string(r);
    expect_equal(download<uint16_t>(out[r].out), want[r].out, at + " combine out");
    if (c.weights)
      expect_equal(download<float>(out[r].combined_topk_weights), want[r].combined_topk_weights,
                   at + " combined weights");
  }
}

void run_case(const InCase& c, std::mt19937_64& rng, VirtualGroup* shared = nullptr) {
  std::unique_ptr<VirtualGroup> own;
  if (!shared) own = std::make_unique<VirtualGroup>(case_config(c), c.R, std::vector<int>{0}, c.N);
  VirtualGroup& group = shared ? *shared : *own;
  CHECK_EQ(group.num_nodes(), c.N);
  const std::string tag = c.name();
  auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
  const SendSide send = make_send_side(c, in);
  ref::Shape shape{c.R, c.E, c.K, c.H};
  const auto want = ref::ht_dispatch(shape, routings(in), send.payload, c.alignment);

  auto first = run_dispatch(group, c, in, send);
  poison_receive_buffers(c, first);
  auto out = run_dispatch(group, c, in, send);
  verify_dispatch(c, out, want, tag);
  check_combine(group, c, rng, in, out, want, tag);

  if (c.check_cached && c.sizing == Sizing::kExact) {
    // Same routing, new values: a cached dispatch must equal a fresh one, and its combine too.
    for (auto& r : in) {
      r.x = random_bf16(rng, r.x.size());
      r.d_x.upload(r.x);
    }
    const SendSide send2 = make_send_side(c, in);
    const auto want2 = ref::ht_dispatch(shape, routings(in), send2.payload, c.alignment);
    std::vector<Handle> handles;
    for (auto& o : out) handles.push_back(o.handle);
    poison_receive_buffers(c, out, /*handle_too=*/false);
    auto again = run_dispatch(group, c, in, send2, &handles);
    verify_dispatch(c, again, want2, tag + " cached");
    check_combine(group, c, rng, in, again, want2, tag + " cached");
  }
}

std::vector<int64_t> random_tokens(std::mt19937_64& rng, int R, int max_tokens, bool zero_first) {
  std::vector<int64_t> t(R);
  for (int r = 0; r < R; ++r) t[r] = std::uniform_int_distribution<int64_t>(0, max_tokens)(rng);
  if (zero_first) t[0] = 0;
  return t;
}

bool failed_case() {
  return moecomm::test::state().failures_in_case > 0;
}

}  // namespace

TEST_CASE("Internode HT over node shapes 2x4, 4x2, 2x2, 8x1, 2x8: bf16, weights, bias, cached") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());
  struct Shape {
    int N, G;
  };
  for (const Shape s : {Shape{2, 4}, Shape{4, 2}, Shape{2, 2}, Shape{8, 1}, Shape{2, 8}}) {
    InCase c;
    c.N = s.N;
    c.R = s.N * s.G;
    c.E = 4 * c.R;
    c.K = 6;
    c.H = 512;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, true);  // rank 0 sends nothing
    c.bias = true;
    c.caller_out = s.N == 4;
    run_case(c, rng);
    if (failed_case()) break;
  }
}

TEST_CASE("Internode HT fp8: online quantisation and passthrough, pow2 scales, worst case") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 1);
  InCase c;
  c.R = 8;
  c.N = 2;
  c.E = 32;
  c.K = 8;
  c.H = 1024;
  c.alignment = 128;
  VirtualGroup group(case_config(c), c.R, {0}, c.N);
  for (Payload payload : {Payload::kFp8Quantize, Payload::kFp8Passthrough}) {
    for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
      c.payload = payload;
      c.sizing = sizing;
      // Rank 0 sends nothing: as forwarder it still writes the scales and weights it forwards.
      c.tokens = random_tokens(rng, c.R, c.max_tokens, true);
      run_case(c, rng, &group);
    }
  }
  InCase pow2 = c;  // the scale format is the Config's: a group of its own
  pow2.sizing = Sizing::kExact;
  pow2.scales = ScaleFormat::kPowerOfTwo;
  pow2.payload = Payload::kFp8Quantize;
  pow2.N = 4;
  pow2.tokens = random_tokens(rng, pow2.R, pow2.max_tokens, true);
  run_case(pow2, rng);
}

TEST_CASE("Internode HT bf16 worst-case sizing, -1 experts, T = 0, hidden 136 and 264") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 2);
  for (int H : {136, 264}) {
    InCase c;
    c.R = 4;
    c.N = 2;
    c.E = 16;
    c.K = 5;
    c.H = H;
    c.routing = Routing::kWithDrops;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, true);
    c.tokens[3] = 0;
    c.bias = true;
    run_case(c, rng);
    c.sizing = Sizing::kWorstCase;
    c.caller_out = true;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, false);
    run_case(c, rng);
  }
}

TEST_CASE("Internode HT skewed routing: every token to one node, one expert, no weights") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 3);
  for (Routing routing : {Routing::kFirstRanksOnly, Routing::kOneExpert}) {
    InCase c;
    c.R = 8;
    c.N = 2;  // first-ranks: experts on ranks 0..3 only, node 0
    c.E = 32;
    c.K = 4;
    c.H = 256;
    c.routing = routing;
    c.weights = routing == Routing::kFirstRanksOnly;
    c.tokens.assign(c.R, c.max_tokens);
    run_case(c, rng);
  }
}

TEST_CASE("Internode HT 30 consecutive calls with changing routing, sizes and payloads") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 4);
  InCase base;
  base.R = 8;
  base.N = 4;
  base.E = 32;
  base.K = 4;
  base.H = 256;
  base.max_tokens = 100;
  VirtualGroup group(case_config(base), base.R, {0}, base.N);
  const Routing kinds[] = {Routing::kUniform, Routing::kWithDrops, Routing::kOneExpert,
                           Routing::kFirstRanksOnly};
  for (int i = 0; i < 30 && !failed_case(); ++i) {
    InCase c = base;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, i % 3 == 0);
    c.routing = kinds[i % 4];
    c.sizing = i % 2 ? Sizing::kWorstCase : Sizing::kExact;
    c.payload = i % 5 == 0 ? Payload::kFp8Quantize : Payload::kBf16;
    c.bias = i % 3 == 0;
    c.check_cached = i % 4 == 0;
    run_case(c, rng, &group);
  }
}

TEST_CASE("Internode HT a rank that never calls: TimeoutError naming a peer and its node") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 5);
  InCase c;
  c.R = 4;
  c.N = 2;
  c.E = 16;
  c.K = 2;
  c.H = 256;
  c.tokens.assign(c.R, 32);
  Config cfg = case_config(c);
  cfg.timeout_seconds = 0.5;
  const int absent = 3;  // node 1
  {
    VirtualGroup group(cfg, c.R, {0}, c.N);
    auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
    const SendSide send = make_send_side(c, in);
    for (int r = 0; r < c.R; ++r) {
      if (r == absent) continue;
      DispatchOptions o;
      o.sizing = Sizing::kWorstCase;  // exact sizing would wait on the host for the counts
      group[r].dispatch(dispatch_args(c, in, send, r), o);
    }
    for (int r = 0; r < c.R; ++r) {
      if (r == absent) continue;
      try {
        group[r].synchronize();
        CHECK(false) << "rank " << r << ": no error although rank " << absent << " never called";
      } catch (const TimeoutError& e) {
        const std::string m = e.what();
        CHECK(m.find("peer ") != std::string::npos && m.find("(node ") != std::string::npos)
            << "rank " << r << ": " << m;
      }
    }
  }
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST_CASE("Internode HT refuses masked ranks") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 6);
  InCase c;
  c.R = 4;
  c.N = 2;
  c.tokens.assign(c.R, 16);
  VirtualGroup group(case_config(c), c.R, {0}, c.N);
  auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
  const SendSide send = make_send_side(c, in);
  group[0].mask_rank(1);
  CHECK_THROWS(group[0].dispatch(dispatch_args(c, in, send, 0)), Unsupported, "mask_rank");
  group[0].clear_rank_masks();
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
