// The helpers of the high-throughput GPU tests (test_ht, test_internode_ht): a case, its Config,
// what each rank sends, dispatch on every rank, poisoning of what a dispatch writes, and the checks
// of dispatch and combine against the host reference. HtCase::N > 1 declares N virtual nodes.
#pragma once

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/ep_fixture.hpp"

namespace moecomm::test {

enum class Payload { kBf16, kFp8Passthrough, kFp8Quantize };

struct HtCase {
  int R = 2, E = 8, K = 2, H = 256;
  int N = 1;  // virtual nodes of R / N ranks (VirtualGroup num_nodes, ht_combine's num_nodes)
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
  // The routing inputs too: topk_idx, topk_weights, fp8 x_scales and combine's recv_topk_weights
  // views start view_offset elements into buffers of their own.
  bool offset_routing = false;
  bool poison_device_count = false;  // a fresh dispatch's poison covers num_recv_tokens_device

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
    if (view_offset && offset_routing) s += " (routing too)";
    return s;
  }
};

inline Config case_config(const HtCase& c) {
  Config cfg = test_config(Mode::kHighThroughput, c.E, c.K, c.H, c.max_tokens);
  cfg.expert_alignment = c.alignment;
  cfg.scale_format = c.scales;
  // One node keeps test_config's SMs and needs no RDMA window.
  if (c.N > 1) {
    cfg.num_sms = c.R > 8 ? 8 : 4;  // every rank's blocks co-resident on one GPU
    cfg.rdma_bytes = required_rdma_bytes(cfg, c.R, c.N);
  }
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
  // topk_idx (i64, i32) and topk_weights at view_offset (HtCase::offset_routing)
  std::vector<DeviceBuffer<int64_t>> shifted_idx;
  std::vector<DeviceBuffer<int32_t>> shifted_idx32;
  std::vector<DeviceBuffer<float>> shifted_weights;
};

/// True when the routing inputs are views at view_offset (HtCase::offset_routing).
inline bool routing_shifted(const HtCase& c) {
  return c.offset_routing && c.view_offset != 0;
}

inline SendSide make_send_side(const HtCase& c, const std::vector<RankInput>& in) {
  SendSide s;
  const int G = c.H / 128;
  const int routing_off = routing_shifted(c) ? c.view_offset : 0;
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
      s.fp8_scales.push_back(shifted_copy(p.x_scales, routing_off));
    } else if (c.view_offset) {
      s.shifted_x.push_back(shifted_copy(in[r].x, c.view_offset));
    }
    if (routing_shifted(c)) {
      const std::vector<int64_t>& idx = in[r].routing.topk_idx;
      s.shifted_idx.push_back(shifted_copy(idx, routing_off));
      s.shifted_idx32.push_back(
          shifted_copy(std::vector<int32_t>(idx.begin(), idx.end()), routing_off));
      s.shifted_weights.push_back(shifted_copy(in[r].weights, routing_off));
    }
    s.payload.push_back(std::move(p));
  }
  return s;
}

inline DispatchArgs dispatch_args(const HtCase& c, const std::vector<RankInput>& in,
                                  const SendSide& s, int r) {
  DispatchArgs a;
  const int64_t T = in[r].routing.num_tokens;
  if (c.payload == Payload::kFp8Passthrough) {
    a.x = TensorView::contiguous(s.fp8_x[r].get() + c.view_offset, DType::kFP8E4M3, {T, c.H}, 0);
    a.x_scales =
        TensorView::contiguous(s.fp8_scales[r].get() + (routing_shifted(c) ? c.view_offset : 0),
                               DType::kF32, {T, c.H / 128}, 0);
  } else if (c.view_offset) {
    a.x = TensorView::contiguous(s.shifted_x[r].get() + c.view_offset, DType::kBF16, {T, c.H}, 0);
  } else {
    a.x = in[r].x_view(c.H);
  }
  if (routing_shifted(c)) {
    const int off = c.view_offset;
    a.topk_idx =
        c.i32_idx ? TensorView::contiguous(s.shifted_idx32[r].get() + off, DType::kI32, {T, c.K}, 0)
                  : TensorView::contiguous(s.shifted_idx[r].get() + off, DType::kI64, {T, c.K}, 0);
    if (c.weights)
      a.topk_weights =
          TensorView::contiguous(s.shifted_weights[r].get() + off, DType::kF32, {T, c.K}, 0);
    return a;
  }
  a.topk_idx = in[r].idx_view(c.K, c.i32_idx);
  if (c.weights) a.topk_weights = in[r].weights_view(c.K);
  return a;
}

/// Dispatch on every rank (a host thread each: exact sizing waits on the host).
inline std::vector<DispatchOutput> run_dispatch(VirtualGroup& group, const HtCase& c,
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
inline void poison_receive_buffers(const HtCase& c, const std::vector<DispatchOutput>& out,
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
    if (c.poison_device_count) poison(o.num_recv_tokens_device);
  }
}

template <typename T>
void expect_equal(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  std::string first;
  const int64_t bad = count_mismatches(got, want, &first);
  CHECK(bad == 0) << what << ": " << bad << " of " << want.size() << " differ, first " << first;
}

/// Checks one rank's dispatch output against its reference (`at` names the rank in messages).
inline void verify_rank_dispatch(const HtCase& c, const DispatchOutput& o, const ref::HtReceived& w,
                                 const std::string& at) {
  const int G = c.H / 128;
  int64_t n = o.num_recv_tokens;
  const int64_t n_dev = download<int32_t>(o.num_recv_tokens_device)[0];
  if (c.sizing == Sizing::kExact) {
    CHECK_EQ(n, w.num_recv) << at;
    CHECK_EQ(o.recv_x.shape[0], w.num_recv) << at;
    CHECK(
        o.num_recv_tokens_per_expert_host ==
        std::vector<int>(w.num_recv_tokens_per_expert.begin(), w.num_recv_tokens_per_expert.end()))
        << at << " host per-expert counts";
  } else {
    CHECK_EQ(n, -1) << at;
    n = n_dev;
  }
  CHECK_EQ(n_dev, w.num_recv) << at;
  if (n != w.num_recv) return;
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

inline void verify_dispatch(const HtCase& c, const std::vector<DispatchOutput>& out,
                            const std::vector<ref::HtReceived>& want, const std::string& tag) {
  for (int r = 0; r < c.R; ++r)
    verify_rank_dispatch(c, out[r], want[r], tag + " rank " + std::to_string(r));
}

/// Combine of random expert outputs y (N_r rows on each rank), optional bias, and the received
/// weights; compared with ref::ht_combine (its two-level sum when N > 1).
inline void check_combine(VirtualGroup& group, const HtCase& c, std::mt19937_64& rng,
                          const std::vector<RankInput>& in, const std::vector<DispatchOutput>& disp,
                          const std::vector<ref::HtReceived>& want_disp, const std::string& tag,
                          const std::vector<ref::Routing>* ref_routing = nullptr) {
  std::vector<std::vector<uint16_t>> y(c.R), bias(c.R);
  std::vector<std::vector<float>> recv_w(c.R);
  std::vector<DeviceBuffer<uint16_t>> d_y, d_bias, d_out;
  std::vector<DeviceBuffer<float>> d_recv_w;  // the received weights at view_offset
  const int off = c.view_offset;
  for (int r = 0; r < c.R; ++r) {
    y[r] = random_bf16(rng, static_cast<size_t>(want_disp[r].num_recv) * c.H);
    d_y.push_back(shifted_copy(y[r], off));
    if (c.bias) {
      bias[r] = random_bf16(rng, static_cast<size_t>(in[r].routing.num_tokens) * c.H);
      d_bias.push_back(shifted_copy(bias[r], off));
    }
    if (c.weights) recv_w[r] = want_disp[r].topk_weights;
    // Offset routing: the received weights (as checked against the reference) from a view at
    // view_offset, instead of the dispatch's own output.
    if (c.weights && routing_shifted(c)) d_recv_w.push_back(shifted_copy(recv_w[r], off));
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
            TensorView::contiguous(routing_shifted(c) ? static_cast<void*>(d_recv_w[r].get() + off)
                                                      : disp[r].recv_topk_weights.data,
                                   DType::kF32, {N, c.K}, 0);
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
                                    c.weights ? recv_w : std::vector<std::vector<float>>{}, c.N);
  for (int r = 0; r < c.R; ++r) {
    const std::string at = tag + " rank " + std::to_string(r);
    expect_equal(download<uint16_t>(out[r].out), want[r].out, at + " combine out");
    if (c.weights)
      expect_equal(download<float>(out[r].combined_topk_weights), want[r].combined_topk_weights,
                   at + " combined weights");
  }
}

inline bool failed_case() {
  return moecomm::test::state().failures_in_case > 0;
}

inline std::vector<int64_t> random_tokens(std::mt19937_64& rng, int R, int max_tokens,
                                          bool zero_first) {
  std::vector<int64_t> t(R);
  for (int r = 0; r < R; ++r) t[r] = std::uniform_int_distribution<int64_t>(0, max_tokens)(rng);
  if (zero_first) t[0] = 0;
  return t;
}

}  // namespace moecomm::test
