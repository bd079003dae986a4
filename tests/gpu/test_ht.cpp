// High-throughput dispatch and combine on virtual ranks against the host reference: every output
// element compared bit for bit (combine too: both sum in f32 in ascending rank order).
#include <memory>
#include <random>

#include "gpu/ht_rig.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

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

TEST_CASE(
    "HT fp8 quantisation with the group on every SM (rows stored and combined from registers)") {
  REQUIRE_GPU();
  // Combine reads the peers' rows in bulk loads while the group's blocks fill at most half of the
  // GPU's SMs (every other case here, except views off a 16-byte boundary, which combine reads
  // through registers); beyond, through registers: this case takes that way. Quantised rows leave
  // dispatch from registers in every case.
  std::mt19937_64 rng(seed() + 20);
  HtCase c;
  c.R = 8;
  c.E = 256;
  c.K = 8;
  c.H = 7168;
  c.max_tokens = 512;
  c.tokens = random_tokens(rng, 8, 512, true);
  c.payload = Payload::kFp8Quantize;
  Config cfg = case_config(c);
  cfg.num_sms = device_sm_count(0) / c.R;
  VirtualGroup group(cfg, c.R);
  run_case(c, rng, &group);
  c.H = 7296;  // scales not in whole vectors
  c.E = 64;
  c.payload = Payload::kFp8Quantize;
  c.scales = ScaleFormat::kPowerOfTwo;
  Config odd = case_config(c);
  odd.num_sms = cfg.num_sms;
  VirtualGroup odd_group(odd, c.R);
  run_case(c, rng, &odd_group);
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

TEST_CASE("HT call traces: every phase of dispatch, cached dispatch and combine, in order") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 11);
  HtCase c;
  c.R = 3;
  c.E = 6;
  c.K = 2;
  c.H = 384;
  c.max_tokens = 96;
  c.sizing = Sizing::kWorstCase;
  VirtualGroup group(case_config(c), c.R);
  for (int r = 0; r < c.R; ++r)
    CHECK(group[r].last_call_trace().first_block_start == 0) << "rank " << r << " before a call";
  c.tokens = random_tokens(rng, c.R, c.max_tokens, true);  // a rank may send nothing
  const auto in = make_inputs(rng, c.tokens, c.E, c.K, c.H, c.routing);
  const SendSide send = make_send_side(c, in);
  std::vector<uint64_t> last(c.R, 0);  // each rank's previous call closed then
  auto check_all = [&](const std::string& op) {
    for (int r = 0; r < c.R; ++r) {
      const CallTrace t = group[r].last_call_trace();
      check_trace_order(t, last[r], /*receive_phase=*/false, op + ", rank " + std::to_string(r));
      last[r] = t.closed;
    }
  };
  const auto out = run_dispatch(group, c, in, send);
  check_all("dispatch");
  std::vector<Handle> handles;
  for (const auto& o : out) handles.push_back(o.handle);
  run_dispatch(group, c, in, send, &handles);
  check_all("cached dispatch");
  std::vector<DeviceBuffer<uint16_t>> y;
  for (int r = 0; r < c.R; ++r)
    y.emplace_back(random_bf16(rng, static_cast<size_t>(out[r].recv_x.shape[0]) * c.H));
  for (int r = 0; r < c.R; ++r) {
    CombineArgs a;
    a.y = y[r].view(DType::kBF16, {out[r].recv_x.shape[0], c.H});
    group[r].combine(a, out[r].handle);
  }
  group.synchronize();
  check_all("combine");
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
