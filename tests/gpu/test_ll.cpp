// GPU tests of the low-latency path through the public API: virtual ranks on device 0, driven
// rank after rank from one thread (LL calls never wait on the host), each on its own stream.
// Every valid slot of dispatch and every element of combine is compared bit for bit with the
// host reference (testing/reference); outputs are poisoned before every call.
#include <cuda_runtime_api.h>

#include <random>
#include <string>
#include <vector>

#include "gpu/ll_rig.hpp"

using namespace moecomm;
using namespace moecomm::test::ll;

TEST_CASE("ll: bf16 dispatch/combine, R = 1, 2, 4, 8, random routing with -1, T = 0 and T = M") {
  REQUIRE_GPU();
  for (int ranks : {1, 2, 4, 8}) {
    for (bool i32 : {false, true}) {
      LlParams p;
      p.ranks = ranks;
      p.experts = 32;
      p.topk = 8;
      p.hidden = 256;
      p.capacity = 24;
      p.idx_i32 = i32;
      LlRig rig(p, 100 + ranks * 2 + i32);
      rig.rounds(
          {kBf16, kHooks, kBf16, kHooks}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.15});
    }
  }
}

TEST_CASE("ll: call traces of combine: every phase in order, plain, hooks and one launch") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 3;
  p.experts = 6;
  p.topk = 2;
  p.capacity = 12;
  LlRig rig(p, 150);
  std::vector<uint64_t> last(p.ranks, 0);
  for (const CallMode& mode : {kBf16, kHooks, kOneLaunch}) {
    if (failed()) break;
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode, describe(mode));
    rig.group().synchronize();
    for (int r = 0; r < p.ranks; ++r) {
      const CallTrace t = rig.comm(r).last_call_trace();  // the round's last call: combine
      test::check_trace_order(t, last[r], /*receive_phase=*/false,
                              describe(mode) + ", rank " + std::to_string(r));
      last[r] = t.closed;
    }
  }
}

TEST_CASE("ll: fp8 dispatch, f32 and power-of-two scales, 1 and 3 groups per row") {
  REQUIRE_GPU();
  for (ScaleFormat format : {ScaleFormat::kFloat32, ScaleFormat::kPowerOfTwo}) {
    for (int hidden : {128, 384}) {
      for (int ranks : {2, 4}) {
        LlParams p;
        p.ranks = ranks;
        p.experts = 16;
        p.topk = 4;
        p.hidden = hidden;
        p.capacity = 20;
        p.scale_format = format;
        LlRig rig(p, 200 + hidden + ranks + (format == ScaleFormat::kPowerOfTwo));
        rig.rounds(
            {kFp8, kFp8Hooks, kFp8}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.1});
      }
    }
  }
}

// Hidden 7168 is cut into pieces of whole 128-channel units, as many as the warps allow: 4 pieces
// of 14 units (2 ranks, 4 SMs), 2 of 28 (2 SMs), 7 of 8 (8 ranks, 16 SMs).
TEST_CASE("ll: hidden 7168, T = M, bf16 and fp8, rows in 2, 4 and 7 pieces") {
  REQUIRE_GPU();
  struct Shape {
    int ranks, sms;
  };
  for (ScaleFormat format : {ScaleFormat::kFloat32, ScaleFormat::kPowerOfTwo}) {
    for (Shape sh : {Shape{2, 4}, Shape{2, 2}, Shape{8, 16}}) {
      LlParams p;
      p.ranks = sh.ranks;
      p.experts = 16;
      p.topk = 8;
      p.hidden = 7168;
      p.capacity = 16;
      p.num_sms = sh.sms;
      p.scale_format = format;
      LlRig rig(p, 300 + sh.ranks + sh.sms + (format == ScaleFormat::kPowerOfTwo));
      rig.rounds(
          {kBf16, kFp8, kFp8OneLaunch}, [&] { return std::vector<int64_t>(p.ranks, p.capacity); },
          RoutingSpec{0.05}, "T = M, SMs " + std::to_string(sh.sms) + ", ");
    }
  }
}

TEST_CASE("ll: K = 1 and K = 32") {
  REQUIRE_GPU();
  {
    LlParams p;
    p.ranks = 4;
    p.experts = 8;
    p.topk = 1;
    p.hidden = 128;
    p.capacity = 16;
    LlRig rig(p, 400);
    rig.rounds(
        {kBf16, kHooks, kFp8}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.2}, "K = 1 ");
  }
  {
    LlParams p;
    p.ranks = 8;
    p.experts = 64;
    p.topk = 32;
    p.hidden = 128;
    p.capacity = 8;
    p.threads = 1024;
    LlRig rig(p, 401);
    rig.rounds(
        {kBf16, kHooks, kFp8}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.1}, "K = 32 ");
  }
}

TEST_CASE("ll: every token selects one expert (its slots fill to R * M)") {
  REQUIRE_GPU();
  for (int topk : {1, 4}) {
    LlParams p;
    p.ranks = 4;
    p.experts = 16;
    p.topk = topk;
    p.hidden = 256;
    p.capacity = 32;
    p.threads = 64;
    LlRig rig(p, 500 + topk);
    std::uniform_int_distribution<int> pick(0, p.experts - 1);
    for (bool quantize : {false, true}) {
      RoutingSpec spec;
      spec.hot_expert = pick(rig.rng());
      CallMode mode;
      mode.quantize = quantize;
      rig.round(0, rig.inputs(std::vector<int64_t>(p.ranks, p.capacity), spec), mode,
                "hot expert " + std::to_string(spec.hot_expert));
    }
  }
}

TEST_CASE("ll: T = 0 on every rank, then on some") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 4;
  p.experts = 16;
  p.topk = 4;
  p.hidden = 256;
  p.capacity = 16;
  LlRig rig(p, 600);
  for (int round = 0; round < 4 && !failed(); ++round) {
    CallMode mode;
    mode.hooks = round % 2 == 1;
    mode.quantize = round >= 2;
    std::vector<int64_t> tokens(p.ranks, 0);
    if (round == 3) tokens[1] = p.capacity;
    rig.round(0, rig.inputs(tokens, RoutingSpec{}), mode, "round " + std::to_string(round));
  }
}

TEST_CASE("ll: two calls in flight (both send phases before either hook), hooks in either order") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 4;
  p.experts = 32;
  p.topk = 8;
  p.hidden = 256;
  p.capacity = 16;
  LlRig rig(p, 700);
  for (bool reverse : {false, true}) {
    for (bool quantize : {false, true}) {
      if (failed()) return;
      CallMode mode;
      mode.hooks = true;
      mode.quantize = quantize;
      mode.combine_buffer = reverse;
      const std::string label = std::string(reverse ? "hooks B, A" : "hooks A, B") +
                                (quantize ? " fp8" : " bf16") + " [" + describe(p) + "]";
      rig.upload(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}));
      rig.upload(1, rig.inputs(rig.random_tokens(), RoutingSpec{0.1}));
      rig.poison_all();
      const auto a = rig.send_dispatch(0, mode);
      const auto b = rig.send_dispatch(1, mode);
      if (reverse) {
        rig.call_hooks(b);
        rig.call_hooks(a);
      } else {
        rig.call_hooks(a);
        rig.call_hooks(b);
      }
      rig.group().synchronize();
      rig.check_dispatch(0, a, quantize, "call A " + label);
      rig.check_dispatch(1, b, quantize, "call B " + label);

      const auto ca = rig.send_combine(0, a, mode);
      const auto cb = rig.send_combine(1, b, mode);
      if (reverse) {
        rig.call_hooks(cb);
        rig.call_hooks(ca);
      } else {
        rig.call_hooks(ca);
        rig.call_hooks(cb);
      }
      rig.group().synchronize();
      rig.check_combine(0, ca, mode, "combine A " + label);
      rig.check_combine(1, cb, mode, "combine B " + label);
    }
  }
}

// Shapes are fixed in a graph: the calls are captured with T = M, and each replay marks the
// tokens it does not use with rows of -1 (inputs rewritten in the same device buffers).
TEST_CASE("ll: CUDA graph capture of dispatch -> combine per rank, replayed with new routing") {
  REQUIRE_GPU();
  constexpr int kReplays = 6;
  for (bool hooks : {false, true}) {
    LlParams p;
    p.ranks = 4;
    p.experts = 32;
    p.topk = 4;
    p.hidden = 512;
    p.capacity = 32;
    LlRig rig(p, 800 + hooks);
    CallMode mode;
    mode.hooks = hooks;
    mode.quantize = hooks;  // one bf16 graph, one fp8 graph
    check_graph_replays(rig, mode, kReplays);
  }
}

TEST_CASE("ll: capacity M = 1 and M = 1024") {
  REQUIRE_GPU();
  for (int capacity : {1, 1024}) {
    for (int ranks : {2, 8}) {
      LlParams p;
      p.ranks = ranks;
      p.experts = 8 * ranks;
      p.topk = capacity == 1 ? 2 : 8;
      p.hidden = 128;
      p.capacity = capacity;
      LlRig rig(p, 900 + capacity + ranks);
      rig.rounds(
          {kBf16, kFp8OneLaunch}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.1},
          "M " + std::to_string(capacity) + " ");
    }
  }
}

// Each send block builds the expert bitmaps of its rank's tokens in its own shared memory where
// they fit (E x ceil(T / 32) words up to 48 KB); beyond that every block builds them in global
// memory, behind a grid barrier. E = 768 with T up to 600 puts rank 0 (T = M) past the limit and
// the ranks of few tokens under it, in the same one-launch group call.
TEST_CASE("ll: expert bitmaps in each block's shared memory and in global memory, in one group") {
  REQUIRE_GPU();
  for (int ranks : {2, 3}) {
    LlParams p;
    p.ranks = ranks;
    p.experts = 768;
    p.topk = 8;
    p.hidden = 128;
    p.capacity = 600;
    LlRig rig(p, 950 + ranks);
    const auto tokens = [&] {
      std::vector<int64_t> t = mixed_tokens(rig);
      if (ranks > 2) t[1] = 40;  // under the limit: shared memory
      return t;
    };
    rig.rounds({kOneLaunch, kFp8OneLaunch, kHooks}, tokens, RoutingSpec{0.1});
  }
}

// Bad routing is found by the send blocks as they build the bitmaps, in either place: the
// entry counts as -1, and the host raises naming the value (validate_inputs for repeats).
TEST_CASE("ll: bad topk_idx values raise by name, bitmaps in shared and in global memory") {
  REQUIRE_GPU();
  for (bool global : {false, true}) {
    LlParams p;
    p.ranks = 2;
    p.experts = global ? 768 : 16;
    p.topk = 4;
    p.hidden = 128;
    p.capacity = global ? 600 : 16;
    LlRig rig(p, 960 + global);
    CallMode one;
    one.one_launch = true;
    one.own_out = false;
    for (int bad_case = 0; bad_case < 3 && !failed(); ++bad_case) {
      const std::string where = (global ? "global, " : "shared, ") + std::to_string(bad_case);
      rig.upload(0, rig.inputs(std::vector<int64_t>(p.ranks, p.capacity), RoutingSpec{}));
      int64_t* idx = static_cast<int64_t*>(rig.dispatch_args(0, 1).topk_idx.data);
      const int64_t t = p.capacity - 1, k = 1;  // the last token: its word is the last one
      int64_t value = 0;
      std::string expect;
      if (bad_case == 0) {
        value = p.experts;
        expect = "names expert " + std::to_string(p.experts);
      } else if (bad_case == 1) {
        value = -2;
        expect = "names expert -2";
      } else {
        MOECOMM_CUDA_CHECK(cudaMemcpy(&value, idx + t * p.topk, sizeof(value),
                                      cudaMemcpyDeviceToHost));  // k = 0's expert, again
        expect = "twice";
      }
      MOECOMM_CUDA_CHECK(
          cudaMemcpy(idx + t * p.topk + k, &value, sizeof(value), cudaMemcpyHostToDevice));
      auto outs = rig.send_dispatch(0, one);
      for (int r = 0; r < p.ranks; ++r)
        MOECOMM_CUDA_CHECK(cudaStreamSynchronize(rig.comm(r).stream()));
      CHECK_THROWS(rig.send_dispatch(0, one), InvalidArgument, expect);
      outs.clear();
      rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), one, "after " + where);
    }
  }
}

TEST_CASE(
    "ll: one launch for the whole group (dispatch_all / combine_all) between per-rank calls") {
  REQUIRE_GPU();
  for (int ranks : {1, 2, 3, 4, 8}) {
    for (bool quantize : {false, true}) {
      LlParams p;
      p.ranks = ranks;
      p.experts = 8 * ranks;
      p.topk = 4;
      p.hidden = 256;
      p.capacity = 16;
      LlRig rig(p, 700 + ranks * 2 + quantize);
      // A per-rank round in between: the same state moves on.
      const CallMode one = quantize ? kFp8OneLaunch : kOneLaunch;
      CallMode one_zero_copy = one;
      one_zero_copy.combine_buffer = true;
      rig.rounds(
          {one, quantize ? kFp8 : kBf16, one, one_zero_copy}, [&] { return mixed_tokens(rig); },
          RoutingSpec{0.15});
    }
  }
  // What a single launch cannot do is refused by name, before any rank's state changes.
  LlParams p;
  p.ranks = 2;
  p.experts = 8;
  p.topk = 2;
  p.hidden = 128;
  p.capacity = 8;
  LlRig rig(p, 799);
  std::vector<DispatchArgs> args = {rig.dispatch_args(0, 0), rig.dispatch_args(0, 1)};
  DispatchOptions hooked;
  hooked.return_recv_hook = true;
  CHECK_THROWS(rig.group().dispatch_all(args, hooked), InvalidArgument, "return_recv_hook");
  CHECK_THROWS(rig.group().dispatch_all({args[0]}), InvalidArgument, "one entry per rank");
  args[1].topk_idx = {};
  CHECK_THROWS(rig.group().dispatch_all(args), InvalidArgument, "topk_idx");
  // The group still works, every rank in step.
  CallMode mode;
  mode.one_launch = true;
  mode.own_out = false;
  rig.round(0, rig.inputs({8, 3}, RoutingSpec{0.1}), mode, "after refused calls");
  // combine_all: one handle per rank, and no caller output (each rank's is its own).
  const std::vector<DispatchOutput> outs = rig.send_dispatch(0, mode);
  rig.group().synchronize();
  const std::vector<CombineArgs> cargs = {rig.combine_args(0, 0), rig.combine_args(0, 1)};
  CHECK_THROWS(rig.group().combine_all(cargs, {outs[0].handle}), InvalidArgument, "handles");
  CombineOptions with_out;
  with_out.out = rig.out_view(0, 0);
  CHECK_THROWS(rig.group().combine_all(cargs, {outs[0].handle, outs[1].handle}, with_out),
               InvalidArgument, "options.out");
}

TEST_CASE("ll: 100 consecutive calls with changing T, routing and options") {
  REQUIRE_GPU();
  constexpr int kCalls = 100;
  LlParams p;
  p.ranks = 4;
  p.experts = 16;
  p.topk = 4;
  p.hidden = 256;
  p.capacity = 16;
  p.idx_i32 = true;
  LlRig rig(p, 900);
  std::uniform_int_distribution<int> pick_expert(0, p.experts - 1);
  for (int call = 0; call < kCalls && !failed(); ++call) {
    CallMode mode;
    mode.quantize = call % 3 == 1;
    mode.hooks = call % 2 == 1;
    mode.combine_buffer = call % 5 == 2;
    mode.own_out = call % 7 != 3;
    RoutingSpec spec{call % 4 == 0 ? 0.0 : 0.25};
    if (call % 11 == 5) spec.hot_expert = pick_expert(rig.rng());
    rig.round(0, rig.inputs(rig.random_tokens(), spec), mode, "call " + std::to_string(call));
  }
}

TEST_CASE("ll: hidden not a multiple of 128 (fp8 off): 1000, 136, 64, 8; R = 2, 3, 8") {
  REQUIRE_GPU();
  for (int hidden : {1000, 136, 64, 8}) {
    for (int ranks : {2, 3, 8}) {
      LlParams p;
      p.ranks = ranks;
      p.experts = ranks * 3;
      p.topk = 3;
      p.hidden = hidden;
      p.capacity = 33;
      p.threads = hidden == 64 ? 128 : 512;
      LlRig rig(p, 900 + hidden + ranks);
      rig.rounds(
          {kBf16, kHooks, kZeroCopy, kOneLaunch}, [&] { return mixed_tokens(rig); },
          RoutingSpec{0.1});
    }
  }
}

TEST_CASE("ll: x, y and out views that start off a 16-byte boundary (1, 3 and 7 elements in)") {
  REQUIRE_GPU();
  for (int offset : {1, 3, 7}) {
    LlParams p;
    p.ranks = 4;
    p.experts = 16;
    p.topk = 4;
    p.hidden = 384;
    p.capacity = 24;
    p.view_offset = offset;
    LlRig rig(p, 950 + offset);
    rig.rounds(
        {kBf16, kFp8, kHooks, kOneLaunch}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.1});
  }
}

TEST_CASE("ll: hooks run on side streams are ordered with the rank's next calls") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 4;
  p.experts = 16;
  p.topk = 4;
  p.hidden = 512;
  p.capacity = 32;
  LlRig rig(p, 970);
  for (int round = 0; round < 12 && !failed(); ++round) {
    CallMode mode;
    mode.hooks = true;
    mode.side_stream_hooks = true;
    mode.quantize = round % 3 == 1;
    mode.combine_buffer = round % 4 == 2;
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode,
              "round " + std::to_string(round));
  }
}

TEST_CASE("ll: a pending device error fails dispatch_all before any rank's state changes") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 4;
  p.experts = 16;
  p.topk = 4;
  p.hidden = 256;
  p.capacity = 16;
  LlRig rig(p, 990);
  CallMode one;
  one.one_launch = true;
  one.own_out = false;
  // A call whose routing on rank 2 names an expert out of range: recorded on the device, the
  // entry treated as -1; the host learns it at rank 2's next check.
  rig.upload(0, rig.inputs(std::vector<int64_t>(p.ranks, p.capacity), RoutingSpec{}));
  const int64_t bad = p.experts;
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(rig.dispatch_args(0, 2).topk_idx.data, &bad, sizeof(bad), cudaMemcpyHostToDevice));
  auto outs = rig.send_dispatch(0, one);
  for (int r = 0; r < p.ranks; ++r) MOECOMM_CUDA_CHECK(cudaStreamSynchronize(rig.comm(r).stream()));
  // The next group call must raise before any rank advances its LL buffer...
  CHECK_THROWS(rig.send_dispatch(0, one), InvalidArgument, "rank 2");
  outs.clear();
  // ...so that the ranks are still in step: the following calls are exact.
  for (int round = 0; round < 3 && !failed(); ++round)
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), one,
              "after the error, round " + std::to_string(round));
}

/// Every calling rank reports exactly `want` from masked_ranks().
void expect_masked(LlRig& rig, const std::vector<int>& want, const std::string& what) {
  for (int r = 0; r < rig.R; ++r) {
    if (rig.absent(r)) continue;
    const std::vector<int> got = rig.comm(r).masked_ranks();
    std::string text;
    for (int g : got) text += std::to_string(g) + " ";
    CHECK(got == want) << what << ": rank " << r << " reports masked ranks [" << text << "]";
  }
}

TEST_CASE("ll: masked ranks: out of the group, every mode, then cleared and rejoined") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 5;
  p.experts = 20;
  p.topk = 4;
  p.hidden = 384;
  p.capacity = 24;
  LlRig rig(p, 1010);
  for (uint64_t out : {uint64_t{1} << 2, (uint64_t{1} << 0) | (uint64_t{1} << 4)}) {
    rig.set_out_of_group(out);
    std::vector<int> want;
    for (int d = 0; d < p.ranks; ++d)
      if ((out >> d) & 1ull) want.push_back(d);
    rig.rounds(
        {kBf16, kFp8, kHooks, kOneLaunch}, [&] { return mixed_tokens(rig); }, RoutingSpec{0.1},
        "masked ");
    expect_masked(rig, want, "after masked rounds");
    rig.set_out_of_group(0);
    expect_masked(rig, {}, "after clearing");
    for (int round = 0; round < 2 && !failed(); ++round)
      rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), CallMode{},
                "rejoined round " + std::to_string(round));
  }
}

TEST_CASE("ll: mask_unresponsive_ranks: a rank that stops calling is masked, calls complete") {
  REQUIRE_GPU();
  LlParams p;
  p.ranks = 4;
  p.experts = 16;
  p.topk = 4;
  p.hidden = 256;
  p.capacity = 16;
  p.mask_unresponsive = true;
  p.timeout_seconds = 0.3;
  LlRig rig(p, 1020);
  rig.set_absent(uint64_t{1} << 3);  // rank 3 makes no further call
  for (int round = 0; round < 4 && !failed(); ++round) {
    CallMode mode;
    mode.quantize = round == 1;
    mode.hooks = round == 2;
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), mode,
              "round " + std::to_string(round) + " without rank 3");
  }
  expect_masked(rig, {3}, "after rank 3 stopped");
  for (int r = 0; r < 3; ++r) CHECK_THROWS(rig.comm(r).mask_rank(4), InvalidArgument, "mask_rank");
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
