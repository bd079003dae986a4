// The internode (two-level) high-throughput path on virtual nodes of one GPU against the host
// reference: every dispatch output compared bit for bit with ref::ht_dispatch (the same outputs
// and order as intranode), and combine with ref::ht_combine(..., num_nodes) (the per-node partial
// sums rounded to bf16 before they cross nodes). The seed is printed by the harness.
#include <memory>
#include <random>

#include "gpu/ht_rig.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

/// An internode case: N virtual nodes of R / N ranks, and names that say so.
struct InCase : HtCase {
  InCase() {
    R = 4;
    N = 2;
    E = 16;
    K = 4;
    max_tokens = 160;  // more than two chunks of messages per node
    poison_device_count = true;
  }

  std::string name() const {
    std::string s = std::to_string(N) + "x" + std::to_string(R / N) +
                    " nodes E=" + std::to_string(E) + " K=" + std::to_string(K) +
                    " H=" + std::to_string(H) + " " + routing_name(routing);
    s += payload == Payload::kBf16             ? " bf16"
         : payload == Payload::kFp8Passthrough ? " fp8-pass"
                                               : " fp8-quant";
    if (payload != Payload::kBf16) s += scales == ScaleFormat::kPowerOfTwo ? "/pow2" : "/f32";
    s += sizing == Sizing::kExact ? " exact" : " worst-case";
    if (i32_idx) s += " idx=i32";
    if (view_offset) s += " view_offset=" + std::to_string(view_offset);
    if (view_offset && offset_routing) s += " (routing too)";
    return s;
  }
};

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

}  // namespace

TEST_CASE(
    "Internode HT over node shapes 2x4, 4x2, 2x2, 8x1, 2x8, 3x2, 3x1: bf16, weights, bias, "
    "cached") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed());
  struct Shape {
    int N, G;
  };
  for (const Shape s : {Shape{2, 4}, Shape{4, 2}, Shape{2, 2}, Shape{8, 1}, Shape{2, 8},
                        Shape{3, 2}, Shape{3, 1}}) {
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

// An odd number of nodes: 3 nodes of 2 ranks, and 3 nodes of 1 rank (every row crosses nodes).
// Each payload and sizing, with -1 entries (some rows all -1) and one rank with no tokens (a
// different one each time), in one group per shape.
TEST_CASE("Internode HT on 3 nodes (3x2, 3x1): -1 experts, a rank with T = 0, bf16 and fp8") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 7);
  struct Shape {
    int N, G;
  };
  for (const Shape s : {Shape{3, 2}, Shape{3, 1}}) {
    InCase c;
    c.N = s.N;
    c.R = s.N * s.G;
    c.E = 8 * c.R;  // 48 or 24 experts: 8 per rank
    c.K = 8;
    c.H = 512;
    c.alignment = 4;
    c.routing = Routing::kWithDrops;
    VirtualGroup group(case_config(c), c.R, {0}, c.N);
    int quiet = 0;  // the rank that sends nothing
    for (Payload payload : {Payload::kBf16, Payload::kFp8Quantize, Payload::kFp8Passthrough}) {
      for (Sizing sizing : {Sizing::kExact, Sizing::kWorstCase}) {
        if (failed_case()) return;
        c.payload = payload;
        c.sizing = sizing;
        c.tokens = random_tokens(rng, c.R, c.max_tokens, false);
        c.tokens[quiet] = 0;
        quiet = (quiet + 1) % c.R;
        c.bias = sizing == Sizing::kExact;
        c.caller_out = sizing == Sizing::kWorstCase;
        c.i32_idx = payload == Payload::kFp8Passthrough;
        run_case(c, rng, &group);
      }
    }
  }
}

// Views that start at odd element offsets into larger allocations, on 2 nodes of 4 ranks: x (bf16,
// or fp8 one byte per element), x_scales, topk_idx (i64 and i32), topk_weights, y, bias, out and
// combine's recv_topk_weights; rows off a 16-byte boundary are staged by the library.
TEST_CASE("Internode HT 2x4: x, topk_idx, weights, y, bias and out views at odd element offsets") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 8);
  InCase base;
  base.R = 8;
  base.N = 2;
  base.E = 32;
  base.K = 6;
  base.H = 384;
  base.routing = Routing::kWithDrops;
  base.bias = true;
  base.offset_routing = true;
  VirtualGroup group(case_config(base), base.R, {0}, base.N);
  for (int off : {1, 3, 7}) {
    if (failed_case()) return;
    InCase c = base;
    c.view_offset = off;
    c.i32_idx = off == 3;
    c.caller_out = true;
    c.tokens = random_tokens(rng, c.R, c.max_tokens, off == 3);
    run_case(c, rng, &group);
    c.payload = Payload::kFp8Quantize;
    c.sizing = Sizing::kWorstCase;
    c.caller_out = false;
    run_case(c, rng, &group);
    c.payload = Payload::kFp8Passthrough;  // fp8 x one byte per element: 1, 3, 7 bytes in
    c.sizing = Sizing::kExact;
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
