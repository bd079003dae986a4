// GPU tests of the low-latency path of a group that spans nodes: virtual ranks on device 0 declared
// as N virtual nodes (VirtualGroup num_nodes), so that ranks of different nodes talk only through
// the RDMA engine (the loopback engine). Driven rank after rank from one thread (LL calls never
// wait on the host), each rank on its own stream. Every valid slot of dispatch and every element
// of combine is compared bit for bit with the host reference (ref::ll_dispatch / ll_combine: the
// node layout changes nothing in LL's outputs); outputs are poisoned before every call.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "gpu/ll_rig.hpp"

using namespace moecomm;
using namespace moecomm::test::ll;

namespace {

constexpr int kSmsBudget = 128;  // R * num_sms of every group fits an H200's 132 SMs

struct Topology {
  int nodes;
  int per_node;  // G
};

LlParams topology_params(const Topology& t) {
  LlParams p;
  p.nodes = t.nodes;
  p.ranks = t.nodes * t.per_node;
  p.experts = 2 * p.ranks;
  p.topk = 4;
  p.hidden = 256;
  p.capacity = 16;
  p.num_sms = std::min(16, kSmsBudget / p.ranks);  // 16 ranks: 8 SMs each
  return p;
}

}  // namespace

TEST_CASE(
    "internode ll: nodes 2x4, 4x2, 2x2, 8x1, 2x8, 3x2, 3x1; bf16 and fp8, hooks, -1, T = 0 and "
    "T = M") {
  REQUIRE_GPU();
  for (const Topology& t : {Topology{2, 4}, Topology{4, 2}, Topology{2, 2}, Topology{8, 1},
                            Topology{2, 8}, Topology{3, 2}, Topology{3, 1}}) {
    const LlParams p = topology_params(t);
    LlRig rig(p, 100 + t.nodes * 16 + t.per_node);
    // Consecutive calls alternate the two buffers (and the engine's per-buffer signals).
    rig.rounds(
        {kBf16, kHooks, CallMode{.quantize = true, .own_out = false}, kFp8Hooks},
        [&] { return mixed_tokens(rig); }, RoutingSpec{0.15});
  }
}

TEST_CASE("internode ll: skewed routing (every token to the experts of one node), T = 0 on all") {
  REQUIRE_GPU();
  for (const Topology& t : {Topology{2, 4}, Topology{4, 2}, Topology{3, 2}}) {
    const LlParams p = topology_params(t);
    LlRig rig(p, 200 + t.nodes);
    for (int node = 0; node < t.nodes && !failed(); node += t.nodes - 1) {
      for (bool quantize : {false, true}) {
        CallMode mode;
        mode.quantize = quantize;
        mode.hooks = quantize;
        RoutingSpec spec;
        spec.only_node = node;
        rig.round(0, rig.inputs(std::vector<int64_t>(p.ranks, p.capacity), spec), mode,
                  "all tokens to node " + std::to_string(node));
      }
    }
    rig.round(0, rig.inputs(std::vector<int64_t>(p.ranks, 0), RoutingSpec{}), CallMode{},
              "T = 0 on every rank");
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.5}), CallMode{},
              "half the entries -1");
  }
}

TEST_CASE("internode ll: hidden 136 (bf16, not a multiple of 128) and pow2 fp8 scales") {
  REQUIRE_GPU();
  for (const Topology& t : {Topology{2, 2}, Topology{2, 4}}) {
    LlParams p = topology_params(t);
    p.hidden = 136;
    LlRig rig(p, 300 + t.per_node);
    for (int round = 0; round < 2 && !failed(); ++round) {
      CallMode mode;
      mode.hooks = round == 1;
      rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode,
                "H=136 round " + std::to_string(round));
    }
  }
  LlParams p = topology_params(Topology{2, 2});
  p.hidden = 384;  // three scale groups per row
  p.scale_format = ScaleFormat::kPowerOfTwo;
  LlRig rig(p, 310);
  for (int round = 0; round < 2 && !failed(); ++round) {
    CallMode mode;
    mode.quantize = true;
    mode.hooks = round == 1;
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode,
              "pow2 round " + std::to_string(round));
  }
}

// An odd number of nodes with a larger MoE shape: 3 nodes of 2 ranks and 3 nodes of 1 rank (every
// message crosses nodes), 8 experts per rank (48 or 24), top-8, a third of the entries -1, a
// different rank with no tokens each round; bf16 and fp8, with and without hooks.
TEST_CASE("internode ll: 3 nodes (3x2, 3x1), 8 experts per rank, top-8, -1, T = 0; bf16, fp8") {
  REQUIRE_GPU();
  for (const Topology& t : {Topology{3, 2}, Topology{3, 1}}) {
    LlParams p = topology_params(t);
    p.experts = 8 * p.ranks;
    p.topk = 8;
    p.hidden = 512;
    p.capacity = 24;
    LlRig rig(p, 800 + t.per_node);
    for (int round = 0; round < 6 && !failed(); ++round) {
      CallMode mode;
      mode.quantize = round % 2 == 1;
      mode.hooks = round == 2 || round == 3;
      mode.combine_buffer = round == 4;
      mode.own_out = round != 5;
      std::vector<int64_t> tokens = rig.random_tokens();
      tokens[round % p.ranks] = 0;
      tokens[(round + 1) % p.ranks] = p.capacity;
      rig.round(0, rig.inputs(tokens, RoutingSpec{0.3}), mode, "round " + std::to_string(round));
    }
  }
}

// Views that start at odd element offsets into larger allocations, on 2 nodes of 4 ranks: x, y and
// out (bf16: 2, 6, 14 bytes off a 16-byte boundary), topk_idx (i64, and i32 at offset 3) and
// topk_weights.
TEST_CASE("internode ll 2x4: x, topk_idx, weights, y and out views at odd element offsets") {
  REQUIRE_GPU();
  for (int offset : {1, 3, 7}) {
    LlParams p = topology_params(Topology{2, 4});
    p.hidden = 384;
    p.capacity = 24;
    p.view_offset = offset;
    p.offset_routing = true;
    p.idx_i32 = offset == 3;
    LlRig rig(p, 900 + offset);
    rig.rounds(
        {kBf16, kFp8, kHooks, CallMode{.quantize = true, .hooks = true, .own_out = false}},
        [&] { return mixed_tokens(rig); }, RoutingSpec{0.15});
  }
}

TEST_CASE("internode ll: zero-copy combine buffer, and two calls in flight with hooks either way") {
  REQUIRE_GPU();
  const LlParams p = topology_params(Topology{2, 4});
  LlRig rig(p, 400);
  for (bool hooks : {false, true}) {
    CallMode mode;
    mode.combine_buffer = true;
    mode.hooks = hooks;
    mode.quantize = hooks;
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode, "combine_buffer");
  }
  for (bool reverse : {false, true}) {
    if (failed()) return;
    CallMode mode;
    mode.hooks = true;
    mode.quantize = reverse;
    mode.combine_buffer = reverse;
    const std::string label =
        std::string(reverse ? "hooks B, A" : "hooks A, B") + " [" + describe(p) + "]";
    rig.upload(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}));
    rig.upload(1, rig.inputs(rig.random_tokens(), RoutingSpec{0.1}));
    rig.poison_all();
    const auto a = rig.send_dispatch(0, mode);
    const auto b = rig.send_dispatch(1, mode);
    rig.call_hooks(reverse ? b : a);
    rig.call_hooks(reverse ? a : b);
    rig.group().synchronize();
    rig.check_dispatch(0, a, mode.quantize, "call A " + label);
    rig.check_dispatch(1, b, mode.quantize, "call B " + label);
    const auto ca = rig.send_combine(0, a, mode);
    const auto cb = rig.send_combine(1, b, mode);
    rig.call_hooks(reverse ? cb : ca);
    rig.call_hooks(reverse ? ca : cb);
    rig.group().synchronize();
    rig.check_combine(0, ca, mode, "combine A " + label);
    rig.check_combine(1, cb, mode, "combine B " + label);
  }
}

// Shapes are fixed in a graph: the calls are captured with T = M, and each replay marks the
// tokens it does not use with rows of -1 (inputs rewritten in the same device buffers).
TEST_CASE("internode ll: CUDA graph capture of dispatch -> combine per rank, replayed") {
  REQUIRE_GPU();
  constexpr int kReplays = 3;
  for (bool hooks : {false, true}) {
    const LlParams p = topology_params(Topology{2, 2});
    LlRig rig(p, 500 + hooks);
    CallMode mode;
    mode.hooks = hooks;
    mode.quantize = hooks;  // one bf16 graph, one fp8 graph
    check_graph_replays(rig, mode, kReplays);
  }
}

// VirtualGroup::dispatch_all / combine_all serve a one-GPU group from one grid: refused for a group
// that spans nodes (Unsupported naming num_nodes). So are masked ranks. A refused call changes
// nothing: the group goes on.
TEST_CASE(
    "internode ll: one launch for the group and masked ranks are refused, the group goes on") {
  REQUIRE_GPU();
  const LlParams p = topology_params(Topology{2, 2});
  LlRig rig(p, 600);
  rig.upload(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}));
  CallMode one;
  one.one_launch = true;
  CHECK_THROWS(rig.send_dispatch(0, one), Unsupported, "num_nodes = 2");
  rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), CallMode{}, "after dispatch_all");

  rig.upload(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}));
  const auto outs = rig.send_dispatch(0, CallMode{});
  rig.group().synchronize();
  CHECK_THROWS(rig.send_combine(0, outs, one), Unsupported, "num_nodes = 2");
  const auto comb = rig.send_combine(0, outs, CallMode{});  // the handles are still usable
  rig.group().synchronize();
  rig.check_combine(0, comb, CallMode{}, "after combine_all");

  for (int r = 0; r < p.ranks; ++r) rig.comm(r).mask_rank(p.ranks - 1);
  CHECK_THROWS(rig.comm(0).dispatch(rig.dispatch_args(0, 0), DispatchOptions{}), Unsupported,
               "mask_rank");
  for (int r = 0; r < p.ranks; ++r) rig.comm(r).clear_rank_masks();
  rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), CallMode{}, "after mask_rank");

  LlParams q = p;
  q.mask_unresponsive = true;
  VirtualGroup group(make_config(q), q.ranks, {kDevice}, q.nodes);
  CHECK_THROWS(group[0].dispatch(rig.dispatch_args(0, 0), DispatchOptions{}), Unsupported,
               "mask_unresponsive_ranks");
}

TEST_CASE("internode ll: a rank that never calls: TimeoutError naming the peer and its node") {
  REQUIRE_GPU();
  LlParams p = topology_params(Topology{2, 2});
  p.timeout_seconds = 0.5;
  LlRig rig(p, 700);
  rig.upload(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}));
  for (int r = 1; r < p.ranks; ++r)  // rank 0 (node 0) never calls
    rig.comm(r).dispatch(rig.dispatch_args(0, r), DispatchOptions{});
  for (int r = 1; r < p.ranks; ++r) {
    const bool same = r / (p.ranks / p.nodes) == 0;
    try {
      rig.comm(r).synchronize();
      CHECK(false) << "rank " << r << ": no error although rank 0 never called";
    } catch (const TimeoutError& e) {
      const std::string m = e.what();
      const std::string node = same ? "peer 0 (node 0, this node)" : "peer 0 (node 0)";
      const std::string phase = same ? "arrival" : "arrival over RDMA";
      CHECK(m.find("rank " + std::to_string(r)) != std::string::npos &&
            m.find(node) != std::string::npos && m.find(phase) != std::string::npos)
          << "rank " << r << ": " << m;
    }
  }
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
