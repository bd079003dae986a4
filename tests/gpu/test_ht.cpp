// High-throughput dispatch and combine on virtual ranks against the host reference: every output
// element compared bit for bit (combine too: both sum in f32 in ascending rank order).
#include <random>

#include "gpu/ep_fixture.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

enum class Payload { kBf16, kFp8Passthrough, kFp8Quantize };

struct HtCase {
  int R = 2, E = 8, K = 2, H = 256;
  int max_tokens = 256;
  std::vector<int64_t> tokens;  // per rank
  Routing routing = Routing::kUniform;
  Payload payload = Payload::kBf16;
  ScaleFormat scales = ScaleFormat::kFloat32;
  int alignment = 1;
  bool weights = true;
  bool bias = false;
  bool caller_out = false;  // combine into a caller-owned tensor
  Sizing sizing = Sizing::kExact;
  bool check_cached = true;
  bool i32_idx = false;
  int view_offset = 0;  // elements: x, y, bias and out views start this far into their buffers

  std::string name() const {
    std::string s = "R=" + std::to_string(R) + " E=" + std::to_string(E) +
                    " K=" + std::to_string(K) + " H=" + std::to_string(H) + " " +
                    routing_name(routing);
    s += payload == Payload::kBf16             ? " bf16"
         : payload == Payload::kFp8Passthrough ? " fp8-pass"
                                               : " fp8-quant";
    if (payload != Payload::kBf16) s += scales == ScaleFormat::kPowerOfTwo ? "/pow2" : "/f32";
    s += " align=" + std::to_string(alignment);
    s += sizing == Sizing::kExact ? " exact" : " worst-case";
    if (view_offset) s += " view_offset=" + std::to_string(view_offset);
    return s;
  }
};

Config case_config(const HtCase& c) {
  Config cfg = test_config(Mode::kHighThroughput, c.E, c.K, c.H, c.max_tokens);
  cfg.expert_alignment = c.alignment;
  cfg.scale_format = c.scales;
  return cfg;
}

/// A device copy of `host` that starts `offset` elements into its buffer (a view off a 16-byte
/// boundary when offset * sizeof(T) is not a multiple of 16).
template <typename T>
DeviceBuffer<T> shifted_copy(const std::vector<T>& host, int offset) {
  std::vector<T> padded(host.size() + static_cast<size_t>(offset), T{});
  std::copy(host.begin(), host.end(), padded.begin() + offset);
  return DeviceBuffer<T>(padded);
}

/// What each rank sends: its payload for the reference and its device-side dispatch inputs.
struct SendSide {
  std::vector<ref::Payload> payload;
  std::vector<DeviceBuffer<uint8_t>> fp8_x;
  std::vector<DeviceBuffer<float>> fp8_scales;
  std::vector<DeviceBuffer<uint16_t>> shifted_x;  // bf16 x at view_offset (when set)
};

SendSide make_send_side(const HtCase& c, const std::vector<RankInput>& in) {
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
      s.fp8_x.push_back(shifted_copy(p.x, c.view_offset));
      s.fp8_scales.emplace_back(p.x_scales);
    } else if (c.view_offset) {
      s.shifted_x.push_back(shifted_copy(in[r].x, c.view_offset));
    }
    s.payload.push_back(std::move(p));
  }
  return s;
}

DispatchArgs dispatch_args(const HtCase& c, const std::vector<RankInput>& in, const SendSide& s,
                           int r) {
  DispatchArgs a;
  const int64_t T = in[r].routing.num_tokens;
  if (c.payload == Payload::kFp8Passthrough) {
    a.x = TensorView::contiguous(s.fp8_x[r].get() + c.view_offset, DType::kFP8E4M3, {T, c.H}, 0);
    a.x_scales = s.fp8_scales[r].view(DType::kF32, {T, c.H / 128});
  } else if (c.view_offset) {
    a.x = TensorView::contiguous(s.shifted_x[r].get() + c.view_offset, DType::kBF16, {T, c.H}, 0);
  } else {
    a.x = in[r].x_view(c.H);
  }
  a.topk_idx = in[r].idx_view(c.K, c.i32_idx);
  if (c.weights) a.topk_weights = in[r].weights_view(c.K);
  return a;
}

/// Dispatch on every rank (a host thread each: exact sizing waits on the host).
std::vector<DispatchOutput> run_dispatch(VirtualGroup& group, const HtCase& c,
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

/// Poisons what a dispatch writes. The rank prefix and per-expert counts belong to the handle:
/// a cached dispatch reuses them, so they are poisoned only before a fresh one.
void poison_receive_buffers(const HtCase& c, const std::vector<DispatchOutput>& out,
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
  }
}

template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  std::string first;
  const int64_t bad = count_mismatches(got, want, &first);
  CHECK(bad == 0) << what << ": " << bad << " of " << want.size() << " differ, first " << first;
}

void verify_dispatch(const HtCase& c, const std::vector<DispatchOutput>& out,
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

/// Combine of random expert outputs y (N_r rows on each rank), optional bias, and the received
/// weights; compared with ref::ht_combine.
void check_combine(VirtualGroup& group, const HtCase& c, std::mt19937_64& rng,
                   const std::vector<RankInput>& in, const std::vector<DispatchOutput>& disp,
                   const std::vector<ref::HtReceived>& want_disp, const std::string& tag,
                   const std::vector<ref::Routing>* ref_routing = nullptr) {
  std::vector<std::vector<uint16_t>> y(c.R), bias(c.R);
  std::vector<std::vector<float>> recv_w(c.R);
  std::vector<DeviceBuffer<uint16_t>> d_y, d_bias, d_out;
  const int off = c.view_offset;
  for (int r = 0; r < c.R; ++r) {
    y[r] = random_bf16(rng, static_cast<size_t>(want_disp[r].num_recv) * c.H);
    d_y.push_back(shifted_copy(y[r], off));
    if (c.bias) {
      bias[r] = random_bf16(rng, static_cast<size_t>(in[r].routing.num_tokens) * c.H);
      d_bias.push_back(shifted_copy(bias[r], off));
    }
    if (c.weights) recv_w[r] = want_disp[r].topk_weights;
    d_out.emplace_back(static_cast<size_t>(in[r].routing.num_tokens) * c.H + off);
    d_out.back().poison();
  }
  std::vector<CombineOutput> out(c.R);
  auto run = [&]() {
    for (int r = 0; r < c.R; ++r) {
      const int64_t T = in[r].routing.num_tokens, N = want_disp[r].num_recv;
      CombineArgs a;
      a.y = TensorView::contiguous(d_y[r].get() + off, DType::kBF16, {N, c.H}, 0);
      if (c.weights)
        a.recv_topk_weights =
            TensorView::contiguous(disp[r].recv_topk_weights.data, DType::kF32, {N, c.K}, 0);
      if (c.bias) a.bias = TensorView::contiguous(d_bias[r].get() + off, DType::kBF16, {T, c.H}, 0);
      CombineOptions o;
      if (c.caller_out)
        o.out = TensorView::contiguous(d_out[r].get() + off, DType::kBF16, {T, c.H}, 0);
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
  const auto want = ref::ht_combine(shape, ref_routing ? *ref_routing : routings(in), y,
                                    c.bias ? bias : std::vector<std::vector<uint16_t>>{},
                                    c.weights ? recv_w : std::vector<std::vector<float>>{});
  for (int r = 0; r < c.R; ++r) {
    const std::string at = tag + " rank " + std::to_string(r);
    expect_equal(download<uint16_t>(out[r].out), want[r].out, at + " combine out");
    if (c.weights)
      expect_equal(download<float>(out[r].combined_topk_weights), want[r].combined_topk_weights,
                   at + " combined weights");
  }
}

void run_case(const HtCase& c, std::mt19937_64& rng, VirtualGroup* shared = nullptr) {
  std::unique_ptr<VirtualGroup> own;
  if (!shared) own = std::make_unique<VirtualGroup>(case_config(c), c.R);
  VirtualGroup& group = shared ? *shared : *own;
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

  if (c.check_cached) {
    // Same routing, new values: cached dispatch must equal an uncached one.
    for (auto& r : in) {
      r.x = random_bf16(rng, r.x.size());
      r.d_x.upload(r.x);
    }
    const SendSide send2 = make_send_side(c, in);
    const auto want2 = ref::ht_dispatch(shape, routings(in), send2.payload, c.alignment);
    std::vector<Handle> handles;
    for (auto& o : out) handles.push_back(o.handle);
    poison_receive_buffers(c, out, /*handle_too=*/false);
    HtCase cached_case = c;
    cached_case.sizing = Sizing::kExact;  // a cached handle from exact sizing knows N
    auto again =
        run_dispatch(group, c.sizing == Sizing::kExact ? c : cached_case, in, send2, &handles);
    if (c.sizing == Sizing::kExact) verify_dispatch(c, again, want2, tag + " cached");
  }
}

bool failed_case() {
  return moecomm::test::state().failures_in_case > 0;
}

std::vector<int64_t> random_tokens(std::mt19937_64& rng, int R, int max_tokens, bool zero_first) {
  std::vector<int64_t> t(R);
  for (int r = 0; r < R; ++r) t[r] = std::uniform_int_distribution<int64_t>(0, max_tokens)(rng);
  if (zero_first) t[0] = 0;
  return t;
}

}  // namespace

TEST_CASE("HT bf16 over rank counts, T = 0 on a rank, bias, caller output") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());
  for (int R : {1, 2, 4, 8}) {
    HtCase c;
    c.R = R;
    c.E = 64;
    c.K = 8;
    c.H = 2048;
    c.max_tokens = 512;
    c.tokens = random_tokens(rng, R, 512, R > 1);
    c.bias = true;
    c.caller_out = R % 4 == 0;
    run_case(c, rng);
  }
}

TEST_CASE("HT standard hidden 7168 with online fp8, exact and worst case") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 1);
  HtCase c;
  c.R = 8;
  c.E = 256;
  c.K = 8;
  c.H = 7168;
  c.max_tokens = 1024;
  c.tokens.assign(8, 1024);
  c.payload = Payload::kFp8Quantize;
  VirtualGroup group(case_config(c), c.R);
  run_case(c, rng, &group);
  c.sizing = Sizing::kWorstCase;
  c.tokens = random_tokens(rng, 8, 1024, false);
  run_case(c, rng, &group);
  c.payload = Payload::kBf16;
  run_case(c, rng, &group);
}

TEST_CASE("HT hidden 7296, 128 and 16384: fp8 passthrough, pow2 scales, alignment 128") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 2);
  for (int H : {7296, 128, 16384}) {
    HtCase c;
    c.R = 4;
    c.E = 32;
    c.K = 8;
    c.H = H;
    c.max_tokens = 300;
    c.tokens = random_tokens(rng, 4, 300, false);
    c.payload = Payload::kFp8Passthrough;
    c.alignment = 128;
    run_case(c, rng);
    c.payload = Payload::kFp8Quantize;
    c.scales = ScaleFormat::kPowerOfTwo;
    c.i32_idx = true;
    run_case(c, rng);
  }
}

TEST_CASE("HT K = 1 and K = 32, -1 entries, one expert, ranks that receive nothing, odd R") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 3);
  struct Shape {
    int R, E, K;
    Routing routing;
  };
  const Shape shapes[] = {{4, 8, 1, Routing::kUniform},         {2, 64, 32, Routing::kWithDrops},
                          {4, 16, 4, Routing::kOneExpert},      {4, 16, 1, Routing::kOneExpert},
                          {4, 32, 8, Routing::kFirstRanksOnly}, {3, 12, 5, Routing::kWithDrops},
                          {5, 40, 8, Routing::kUniform},        {7, 56, 32, Routing::kWithDrops}};
  for (const auto& s : shapes) {
    HtCase c;
    c.R = s.R;
    c.E = s.E;
    c.K = s.K;
    c.H = 256;
    c.routing = s.routing;
    c.max_tokens = 200;
    c.tokens = random_tokens(rng, s.R, 200, true);
    c.bias = s.K % 2 == 0;
    run_case(c, rng);
  }
}

TEST_CASE("HT 100 consecutive calls with changing routing and sizes") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 4);
  HtCase base;
  base.R = 4;
  base.E = 32;
  base.K = 4;
  base.H = 256;
  base.max_tokens = 128;
  VirtualGroup group(case_config(base), base.R);
  const Routing kinds[] = {Routing::kUniform, Routing::kWithDrops, Routing::kOneExpert,
                           Routing::kFirstRanksOnly};
  for (int i = 0; i < 100; ++i) {
    HtCase c = base;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, i % 3 == 0);
    c.routing = kinds[i % 4];
    c.sizing = i % 2 ? Sizing::kWorstCase : Sizing::kExact;
    c.payload = i % 5 == 0 ? Payload::kFp8Quantize : Payload::kBf16;
    c.bias = i % 7 == 0;
    c.check_cached = i % 10 == 0;
    run_case(c, rng, &group);
    if (moecomm::test::state().failures_in_case > 0) break;
  }
}

TEST_CASE("HT async dispatch and combine return events that order later work") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 5);
  HtCase c;
  c.R = 4;
  c.E = 32;
  c.K = 4;
  c.H = 256;
  c.max_tokens = 128;
  c.tokens = random_tokens(rng, c.R, c.max_tokens, true);
  c.sizing = Sizing::kWorstCase;
  VirtualGroup group(case_config(c), c.R);
  auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
  const SendSide send = make_send_side(c, in);
  ref::Shape shape{c.R, c.E, c.K, c.H};
  const auto want = ref::ht_dispatch(shape, routings(in), send.payload, c.alignment);
  poison_receive_buffers(c, run_dispatch(group, c, in, send));

  std::vector<DispatchOutput> out(c.R);
  for (int r = 0; r < c.R; ++r) {  // worst-case sizing never waits on the host
    DispatchOptions o;
    o.sizing = Sizing::kWorstCase;
    o.async = true;
    out[r] = group[r].dispatch(dispatch_args(c, in, send, r), o);
  }
  for (int r = 0; r < c.R; ++r) {
    CHECK(out[r].event.valid()) << "rank " << r;
    out[r].event.synchronize();
  }
  verify_dispatch(c, out, want, "async dispatch");

  // Combine on the async stream, then a caller stream that waits for the event copies the result.
  std::vector<DeviceBuffer<uint16_t>> y, copy;
  std::vector<std::vector<uint16_t>> y_host(c.R);
  std::vector<CombineOutput> comb(c.R);
  for (int r = 0; r < c.R; ++r) {
    y_host[r] = random_bf16(rng, static_cast<size_t>(want[r].num_recv) * c.H);
    y.emplace_back(y_host[r]);
    copy.emplace_back(static_cast<size_t>(in[r].routing.num_tokens) * c.H);
    copy.back().poison();
  }
  for (int r = 0; r < c.R; ++r) {
    CombineArgs a;
    a.y = y[r].view(DType::kBF16, {want[r].num_recv, c.H});
    CombineOptions o;
    o.async = true;
    comb[r] = group[r].combine(a, out[r].handle, o);
  }
  for (int r = 0; r < c.R; ++r) {
    comb[r].event.stream_wait(group[r].stream());
    MOECOMM_CUDA_CHECK(cudaMemcpyAsync(copy[r].get(), comb[r].out.data, copy[r].bytes(),
                                       cudaMemcpyDeviceToDevice, group[r].stream()));
  }
  group.synchronize();
  const auto want_out = ref::ht_combine(shape, routings(in), y_host, {}, {});
  for (int r = 0; r < c.R; ++r)
    expect_equal(copy[r].download(), want_out[r].out, "async combine rank " + std::to_string(r));
}

TEST_CASE("HT hidden not a multiple of 128 (fp8 off): 1000, 136, 8") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 6);
  for (int H : {1000, 136, 8}) {
    HtCase c;
    c.R = 3;
    c.E = 12;
    c.K = 4;
    c.H = H;
    c.max_tokens = 100;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, true);
    c.routing = Routing::kWithDrops;
    c.bias = true;
    c.caller_out = H != 136;
    run_case(c, rng);
    c.sizing = Sizing::kWorstCase;
    run_case(c, rng);
  }
}

TEST_CASE("HT x, y, bias and out views that start off a 16-byte boundary") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 7);
  for (int off : {1, 3, 7}) {
    HtCase c;
    c.R = 4;
    c.E = 16;
    c.K = 4;
    c.H = 384;
    c.max_tokens = 96;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, off == 3);
    c.view_offset = off;
    c.bias = true;
    c.caller_out = true;
    run_case(c, rng);
    c.payload = Payload::kFp8Quantize;
    c.sizing = Sizing::kWorstCase;
    c.caller_out = false;
    run_case(c, rng);
    c.payload = Payload::kFp8Passthrough;  // fp8 x one byte per element: 1, 3, 7 bytes in
    c.sizing = Sizing::kExact;
    run_case(c, rng);
  }
}

TEST_CASE("HT receive overflow raises on every rank, naming the receiver; the group goes on") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 8);
  HtCase c;
  c.R = 4;
  c.E = 16;
  c.K = 2;
  c.H = 256;
  c.max_tokens = 64;
  Config cfg = case_config(c);
  cfg.max_recv_tokens = 40;  // rank 0 receives every token below: 4 * 64 rows
  VirtualGroup group(cfg, c.R);
  c.tokens.assign(c.R, 64);
  c.routing = Routing::kOneExpert;  // expert 1 lives on rank 0
  auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
  const SendSide send = make_send_side(c, in);
  for (Sizing sizing : {Sizing::kWorstCase, Sizing::kExact}) {
    const char* name = sizing == Sizing::kExact ? "exact" : "worst case";
    std::vector<std::string> errors(c.R);
    std::vector<DispatchOutput> out(c.R);
    try {
      group.parallel_for([&](int r) {
        DispatchOptions o;
        o.sizing = sizing;
        try {
          out[r] = group[r].dispatch(dispatch_args(c, in, send, r), o);
          group[r].synchronize();
        } catch (const InvalidArgument& e) {
          errors[r] = e.what();
        }
      });
    } catch (const std::exception& e) {
      CHECK(false) << name << ": unexpected " << e.what();
    }
    for (int r = 0; r < c.R; ++r)
      CHECK(errors[r].find("max_recv_tokens: rank 0 must receive") != std::string::npos)
          << name << ": rank " << r << " raised '" << errors[r] << "'";
    // Combine with the overflowing handle must not read past the receive buffers.
    if (sizing == Sizing::kWorstCase && !failed_case()) {
      std::vector<DeviceBuffer<uint16_t>> y;
      for (int r = 0; r < c.R; ++r) y.emplace_back(static_cast<size_t>(40) * c.H);
      for (int r = 0; r < c.R; ++r) {
        CombineArgs a;
        a.y = y[r].view(DType::kBF16, {40, c.H});
        group[r].combine(a, out[r].handle);
      }
      group.synchronize();
    }
  }
  // Routing that fits: the same group gives exact results.
  HtCase fits = c;
  fits.routing = Routing::kUniform;
  fits.max_tokens = 10;  // R * 10 = 40 rows: what the receive buffers hold (and get poisoned)
  fits.tokens.assign(c.R, 8);
  run_case(fits, rng, &group);
}

TEST_CASE("HT async calls followed at once by calls on the rank's own stream stay ordered") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 9);
  HtCase c;
  c.R = 4;
  c.E = 16;
  c.K = 4;
  c.H = 1024;
  c.max_tokens = 256;
  c.sizing = Sizing::kWorstCase;
  VirtualGroup group(case_config(c), c.R);
  for (int i = 0; i < 10 && !failed_case(); ++i) {
    c.tokens = random_tokens(rng, c.R, c.max_tokens, i % 3 == 0);
    auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
    const SendSide send = make_send_side(c, in);
    ref::Shape shape{c.R, c.E, c.K, c.H};
    const auto want = ref::ht_dispatch(shape, routings(in), send.payload, c.alignment);
    std::vector<std::vector<uint16_t>> y_host(c.R);
    std::vector<DeviceBuffer<uint16_t>> y;
    for (int r = 0; r < c.R; ++r) {
      y_host[r] = random_bf16(rng, static_cast<size_t>(want[r].num_recv) * c.H);
      y.emplace_back(y_host[r]);
    }
    // Dispatch on the internal async stream, combine at once on the rank's own stream: nothing
    // the caller does orders the two; the library must.
    std::vector<DispatchOutput> out(c.R);
    std::vector<CombineOutput> comb(c.R);
    for (int r = 0; r < c.R; ++r) {
      DispatchOptions o;
      o.sizing = Sizing::kWorstCase;
      o.async = i % 2 == 0;
      out[r] = group[r].dispatch(dispatch_args(c, in, send, r), o);
    }
    for (int r = 0; r < c.R; ++r) {
      CombineArgs a;
      a.y = y[r].view(DType::kBF16, {want[r].num_recv, c.H});
      CombineOptions o;
      o.async = i % 2 == 1;
      comb[r] = group[r].combine(a, out[r].handle, o);
    }
    group.synchronize();
    const auto want_out = ref::ht_combine(shape, routings(in), y_host, {}, {});
    for (int r = 0; r < c.R; ++r)
      expect_equal(download<uint16_t>(comb[r].out), want_out[r].out,
                   "iteration " + std::to_string(i) + " rank " + std::to_string(r));
  }
}

TEST_CASE("HT masked ranks: out of the group on every rank, cached handles refused, rejoined") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 10);
  HtCase c;
  c.R = 4;
  c.E = 16;
  c.K = 4;
  c.H = 256;
  c.max_tokens = 64;
  c.bias = true;
  VirtualGroup group(case_config(c), c.R);
  ref::Shape shape{c.R, c.E, c.K, c.H};
  const int L = c.E / c.R, out_rank = 1;
  c.tokens = random_tokens(rng, c.R, c.max_tokens, false);
  auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, Routing::kWithDrops);
  const SendSide send = make_send_side(c, in);
  const auto before = run_dispatch(group, c, in, send);  // a handle made before the mask

  for (int r = 0; r < c.R; ++r) group[r].mask_rank(out_rank);
  // The reference: rank 1 keeps only its own experts, the others drop rank 1's.
  std::vector<ref::Routing> masked = routings(in);
  for (int r = 0; r < c.R; ++r)
    for (int64_t& e : masked[r].topk_idx)
      if (e >= 0 && ((r == out_rank) != (e / L == out_rank))) e = -1;
  for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
    HtCase m = c;
    m.sizing = sizing;
    const auto want = ref::ht_dispatch(shape, masked, send.payload, c.alignment);
    poison_receive_buffers(m, run_dispatch(group, m, in, send));
    const auto out = run_dispatch(group, m, in, send);
    verify_dispatch(m, out, want, std::string("masked rank 1, ") + m.name());
    if (sizing == Sizing::kExact)
      check_combine(group, m, rng, in, out, want, "masked rank 1 combine", &masked);
  }
  for (int r = 0; r < c.R; ++r) {
    CHECK(group[r].masked_ranks() == std::vector<int>{out_rank}) << "rank " << r;
    DispatchOptions o;
    o.previous_handle = &before[r].handle;
    CHECK_THROWS(group[r].dispatch(dispatch_args(c, in, send, r), o), InvalidArgument,
                 "previous_handle: made while other ranks were masked");
  }
  for (int r = 0; r < c.R; ++r) group[r].clear_rank_masks();
  c.tokens = random_tokens(rng, c.R, c.max_tokens, true);
  run_case(c, rng, &group);  // rejoined: exact against the whole group's reference
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
