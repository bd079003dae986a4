// The rig of the low-latency GPU tests (test_ll, test_internode_ll): a group of virtual ranks on
// device 0, optionally declared as N virtual nodes (LlParams::nodes), driven rank after rank from
// one thread, with every output compared bit for bit with the host reference (ref::ll_dispatch /
// ll_combine: the node layout changes nothing in LL's outputs) and poisoned before every call.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/random.hpp"
#include "gpu/gpu_common.hpp"
#include "reference/reference.hpp"

// A namespace of its own: RankInput here is not ep_fixture.hpp's.
namespace moecomm::test::ll {

inline constexpr int kDevice = 0;
// Both LL buffers are seen (and can be poisoned) after the warm-up rounds.
inline constexpr int kWarmUpRounds = 2;
inline constexpr int kFp8Group = ref::kFp8Group;

struct LlParams {
  int nodes = 1;  // N virtual nodes of R / N ranks (VirtualGroup num_nodes); 1: one node
  int ranks = 2;
  int experts = 16;
  int topk = 4;
  int hidden = 256;
  int capacity = 16;  // M
  ScaleFormat scale_format = ScaleFormat::kFloat32;
  bool idx_i32 = false;
  int threads = 512;
  int num_sms = 4;                 // Config::num_sms of every rank
  int view_offset = 0;             // elements: x, y and out views start this far into their buffers
  bool offset_routing = false;     // topk_idx and topk_weights views start view_offset in too
  bool mask_unresponsive = false;  // Config::mask_unresponsive_ranks
  double timeout_seconds = 10.0;
};

inline std::string describe(const LlParams& p) {
  std::ostringstream os;
  if (p.nodes > 1) os << "N=" << p.nodes << " ";  // the labels of one node name no N
  os << "R=" << p.ranks << " E=" << p.experts << " K=" << p.topk << " H=" << p.hidden
     << " M=" << p.capacity << (p.idx_i32 ? " idx=i32" : " idx=i64")
     << (p.scale_format == ScaleFormat::kPowerOfTwo ? " scales=pow2" : " scales=f32")
     << " threads=" << p.threads;
  if (p.view_offset) os << " view_offset=" << p.view_offset;
  if (p.view_offset && p.offset_routing) os << " (routing too)";
  return os.str();
}

inline Config make_config(const LlParams& p) {
  Config c;
  c.num_experts = p.experts;
  c.hidden = p.hidden;
  c.topk = p.topk;
  c.max_tokens_per_rank = p.capacity;
  c.low_latency_max_tokens = p.capacity;
  c.mode = Mode::kLowLatency;
  c.num_sms = p.num_sms;
  c.threads_per_block = p.threads;
  c.enable_fp8 = p.hidden % kFp8Group == 0;  // fp8 needs whole 128-channel groups
  c.scale_format = p.scale_format;
  c.validate_inputs = true;
  c.mask_unresponsive_ranks = p.mask_unresponsive;
  c.timeout_seconds = p.timeout_seconds;
  // One node needs no RDMA window (rdma_bytes stays 0).
  if (p.nodes > 1) c.rdma_bytes = required_rdma_bytes(c, p.ranks, p.nodes);
  return c;
}

/// Options of one dispatch + combine round.
struct CallMode {
  bool quantize = false;           // bf16 -> fp8 on the way
  bool hooks = false;              // return_recv_hook on dispatch and combine, hooks called after
  bool combine_buffer = false;     // y written into comm.combine_buffer(handle) (zero-copy combine)
  bool own_out = true;             // combine into a caller-owned tensor, else the library's
  bool one_launch = false;         // VirtualGroup::dispatch_all / combine_all (one kernel per call)
  bool side_stream_hooks = false;  // hooks run on a stream of their own (not the call's)
};

// The modes tests run their rounds in (designated initialisers make the others).
inline constexpr CallMode kBf16{};
inline constexpr CallMode kFp8{.quantize = true};
inline constexpr CallMode kHooks{.hooks = true};
inline constexpr CallMode kFp8Hooks{.quantize = true, .hooks = true};
inline constexpr CallMode kZeroCopy{.combine_buffer = true};
/// VirtualGroup::dispatch_all / combine_all: combine_all writes each rank's own output.
inline constexpr CallMode kOneLaunch{.own_out = false, .one_launch = true};
inline constexpr CallMode kFp8OneLaunch{.quantize = true, .own_out = false, .one_launch = true};

inline std::string describe(const CallMode& m) {
  std::string s = m.quantize ? "fp8" : "bf16";
  if (m.hooks) s += " hooks";
  if (m.combine_buffer) s += " combine_buffer";
  if (!m.own_out) s += " library_out";
  if (m.one_launch) s += " one_launch";
  if (m.side_stream_hooks) s += " side_stream_hooks";
  return s;
}

/// One rank's inputs of a call.
struct RankInput {
  int64_t tokens = 0;
  std::vector<int64_t> idx;  // [T*K]
  std::vector<uint16_t> x;   // [T*H] bf16
  std::vector<float> w;      // [T*K]
};

/// How the routing of a call is drawn.
struct RoutingSpec {
  double drop = 0.0;    // fraction of entries set to -1
  int hot_expert = -1;  // >= 0: every token selects this expert
  int64_t active = -1;  // >= 0: tokens from here on select nothing (rows of -1)
  int only_node = -1;   // >= 0: every token selects experts of this node only (skewed routing)
};

/// Copies src to dst from element `offset` on.
template <typename T>
void upload_prefix(DeviceBuffer<T>& dst, const std::vector<T>& src, size_t offset = 0) {
  if (offset + src.size() > dst.size())
    throw std::runtime_error("upload_prefix: input larger than buffer");
  if (!src.empty())
    MOECOMM_CUDA_CHECK(
        cudaMemcpy(dst.get() + offset, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

/// Room for views that start `view_offset` elements into a buffer.
constexpr size_t kViewPad = 16;

inline bool has_shape(const TensorView& v, DType dtype, std::initializer_list<int64_t> shape) {
  if (v.dtype != dtype || v.ndim != static_cast<int>(shape.size())) return false;
  int i = 0;
  for (int64_t s : shape)
    if (v.shape[i++] != s) return false;
  return v.numel() == 0 || v.is_contiguous();  // strides of an empty tensor do not matter
}

/// A group of virtual ranks with device inputs sized for the capacity M (kSets independent
/// input sets, for two calls in flight), the host copies of the inputs, and every output view
/// the library has returned so far (poisoned before each call).
class LlRig {
 public:
  static constexpr int kSets = 2;

  LlRig(const LlParams& p, uint64_t salt)
      : p_(p),
        R(p.ranks),
        E(p.experts),
        K(p.topk),
        H(p.hidden),
        M(p.capacity),
        L(p.experts / p.ranks),
        group_(make_config(p), p.ranks, {kDevice}, p.nodes),
        rng_(test::seed() * 0x9E3779B97F4A7C15ull + salt) {
    const size_t y_elems = static_cast<size_t>(L) * R * M * H;
    for (int s = 0; s < kSets; ++s) {
      bufs_[s].resize(R);
      inputs_[s].resize(R);
      y_host_[s].resize(R);
      for (int r = 0; r < R; ++r) {
        Buffers& b = bufs_[s][r];
        b.x = DeviceBuffer<uint16_t>(static_cast<size_t>(M) * H + kViewPad);
        b.idx64 = DeviceBuffer<int64_t>(static_cast<size_t>(M) * K + kViewPad);
        b.idx32 = DeviceBuffer<int32_t>(static_cast<size_t>(M) * K + kViewPad);
        b.w = DeviceBuffer<float>(static_cast<size_t>(M) * K + kViewPad);
        b.y = DeviceBuffer<uint16_t>(y_elems + kViewPad);
        b.out = DeviceBuffer<uint16_t>(static_cast<size_t>(M) * H + kViewPad);
      }
    }
    for (int r = 0; r < R; ++r) {
      cudaStream_t st = nullptr;
      MOECOMM_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
      side_streams_.push_back(st);
    }
    known_.resize(R);
    // Warm-up (checked too): afterwards both LL buffers' views are known and get poisoned.
    for (int i = 0; i < kWarmUpRounds; ++i) {
      CallMode mode;
      mode.own_out = false;
      round(0, inputs(std::vector<int64_t>(R, M), RoutingSpec{0.1}), mode, "warm-up");
    }
  }

  ~LlRig() {
    for (cudaStream_t st : side_streams_) {
      cudaStreamSynchronize(st);
      cudaStreamDestroy(st);
    }
  }
  LlRig(const LlRig&) = delete;
  LlRig& operator=(const LlRig&) = delete;

  MoECommunicator& comm(int r) { return group_[r]; }

  /// Ranks out of the group from the next call on: every calling rank masks them (they mask
  /// themselves too, so their calls complete alone). 0 clears every mask.
  void set_out_of_group(uint64_t out) {
    for (int r = 0; r < R; ++r) {
      if (absent(r)) continue;
      comm(r).clear_rank_masks();
      for (int d = 0; d < R; ++d)
        if ((out >> d) & 1ull) comm(r).mask_rank(d);
    }
    out_mask_ = out;
  }
  /// Ranks that make no calls from now on (a dead peer): the others skip them.
  void set_absent(uint64_t absent) { absent_ = absent; }
  bool absent(int r) const { return (absent_ >> r) & 1ull; }

  /// The routing the reference sees for rank r: an absent rank sends nothing; a rank out of the
  /// group keeps only its own experts; the others drop the experts of ranks out or absent.
  ref::Routing ref_routing(int set, int r) const {
    const RankInput& in = inputs_[set][r];
    if (absent(r)) return ref::Routing{0, {}};
    const uint64_t gone = out_mask_ | absent_;
    ref::Routing routing{in.tokens, in.idx};
    for (int64_t& e : routing.topk_idx) {
      if (e < 0) continue;
      const int owner = static_cast<int>(e / L);
      const bool keep = ((gone >> r) & 1ull) ? owner == r : !((gone >> owner) & 1ull);
      if (!keep) e = -1;
    }
    return routing;
  }
  VirtualGroup& group() { return group_; }
  std::mt19937_64& rng() { return rng_; }

  /// Random inputs with the given token counts.
  std::vector<RankInput> inputs(const std::vector<int64_t>& tokens, const RoutingSpec& spec) {
    std::vector<RankInput> in(R);
    for (int r = 0; r < R; ++r) in[r] = random_input(tokens[r], spec);
    return in;
  }

  /// One rank's random inputs of T tokens.
  RankInput random_input(int64_t T, const RoutingSpec& spec) {
    RankInput in;
    in.tokens = T;
    if (spec.only_node >= 0) {
      const int node_experts = E / p_.nodes;  // the experts of one node's G ranks
      in.idx = test::random_topk(rng_, T, node_experts, K, spec.drop);
      for (int64_t& e : in.idx)
        if (e >= 0) e += int64_t{spec.only_node} * node_experts;
    } else {
      in.idx = test::random_topk(rng_, T, E, K, spec.drop);
    }
    std::uniform_int_distribution<int> pick_k(0, K - 1);
    for (int64_t t = 0; t < T; ++t) {
      int64_t* row = &in.idx[t * K];
      if (spec.hot_expert >= 0 && std::find(row, row + K, spec.hot_expert) == row + K)
        row[pick_k(rng_)] = spec.hot_expert;
      if (spec.active >= 0 && t >= spec.active) std::fill(row, row + K, -1);
    }
    in.x = test::random_bf16(rng_, static_cast<size_t>(T) * H);
    // Some all-zero 128-channel groups: the amax floor of the fp8 scale.
    std::bernoulli_distribution zero_group(0.05);
    for (int64_t t = 0; t < T; ++t)
      for (int g = 0; g < H / kFp8Group; ++g)
        if (zero_group(rng_))
          std::fill_n(in.x.begin() + t * H + int64_t{g} * kFp8Group, kFp8Group, uint16_t{0});
    in.w = test::random_f32(rng_, static_cast<size_t>(T) * K, -1.0f, 1.0f);
    return in;
  }

  /// Token counts drawn uniformly from [0, M].
  std::vector<int64_t> random_tokens() {
    std::uniform_int_distribution<int64_t> pick(0, M);
    std::vector<int64_t> t(R);
    for (auto& v : t) v = pick(rng_);
    return t;
  }

  /// Uploads one input set (and a fresh random y for its combine).
  void upload(int set, std::vector<RankInput> in) {
    const size_t y_elems = static_cast<size_t>(L) * R * M * H;
    for (int r = 0; r < R; ++r) {
      Buffers& b = bufs_[set][r];
      const RankInput& i = in[r];
      upload_prefix(b.x, i.x, p_.view_offset);
      upload_prefix(b.idx64, i.idx, routing_offset());
      upload_prefix(b.idx32, std::vector<int32_t>(i.idx.begin(), i.idx.end()), routing_offset());
      upload_prefix(b.w, i.w, routing_offset());
      y_host_[set][r] = test::random_bf16(rng_, y_elems);
      upload_prefix(b.y, y_host_[set][r], p_.view_offset);
    }
    inputs_[set] = std::move(in);
  }

  /// Writes the poison byte over every output the library has returned so far and over the
  /// caller-owned combine outputs. No call may be in flight.
  void poison_all() {
    for (int r = 0; r < R; ++r)
      for (const Known& k : known_[r])
        MOECOMM_CUDA_CHECK(cudaMemset(k.data, test::kPoison, k.bytes));
    for (auto& set : bufs_)
      for (Buffers& b : set) b.out.poison();
  }

  /// Dispatch send (and, without hooks, receive) of every rank, rank after rank.
  std::vector<DispatchOutput> send_dispatch(int set, const CallMode& mode) {
    std::vector<DispatchOutput> outs(R);
    if (mode.one_launch) {
      std::vector<DispatchArgs> args(R);
      for (int r = 0; r < R; ++r) args[r] = dispatch_args(set, r);
      DispatchOptions o;
      o.quantize_fp8 = mode.quantize;
      outs = group_.dispatch_all(args, o);
      for (int r = 0; r < R; ++r) remember(r, outs[r]);
      return outs;
    }
    for (int r = 0; r < R; ++r) {
      if (absent(r)) continue;
      DispatchOptions o;
      o.quantize_fp8 = mode.quantize;
      o.return_recv_hook = mode.hooks;
      outs[r] = comm(r).dispatch(dispatch_args(set, r), o);
      remember(r, outs[r]);
    }
    return outs;
  }

  /// Combine send (and, without hooks, receive) of every rank for the dispatch `outs` of `set`.
  std::vector<CombineOutput> send_combine(int set, const std::vector<DispatchOutput>& outs,
                                          const CallMode& mode) {
    std::vector<CombineArgs> args(R);
    for (int r = 0; r < R; ++r) {
      args[r] = combine_args(set, r);
      if (mode.combine_buffer && !absent(r)) {
        const TensorView cb = comm(r).combine_buffer(outs[r].handle);
        CHECK(has_shape(cb, DType::kBF16, {L, int64_t{R} * M, H}))
            << "combine_buffer is " << cb.describe() << " on rank " << r;
        if (cb.nbytes() < y_host_[set][r].size() * sizeof(uint16_t))
          throw std::runtime_error("combine_buffer too small: " + cb.describe());
        MOECOMM_CUDA_CHECK(cudaMemcpy(cb.data, y_host_[set][r].data(),
                                      y_host_[set][r].size() * sizeof(uint16_t),
                                      cudaMemcpyHostToDevice));
        args[r].y = cb;
      }
    }
    std::vector<CombineOutput> comb(R);
    if (mode.one_launch) {
      std::vector<Handle> handles(R);
      for (int r = 0; r < R; ++r) handles[r] = outs[r].handle;
      return group_.combine_all(args, handles);
    }
    for (int r = 0; r < R; ++r) {
      if (absent(r)) continue;
      CombineOptions o;
      o.return_recv_hook = mode.hooks;
      if (mode.own_out) o.out = out_view(set, r);
      comb[r] = comm(r).combine(args[r], outs[r].handle, o);
    }
    return comb;
  }

  /// Calls every rank's receive hook (rank after rank), on the call's stream or on a side
  /// stream of the rank's own (the library orders it with the rank's other calls).
  template <typename Output>
  void call_hooks(const std::vector<Output>& outs, bool side_streams = false) {
    for (size_t r = 0; r < outs.size(); ++r) {
      if (absent(static_cast<int>(r))) continue;
      CHECK(outs[r].hook.valid()) << "no hook returned on rank " << r;
      if (outs[r].hook.valid()) outs[r].hook(side_streams ? side_streams_[r] : nullptr);
    }
  }

  /// Upload, poison, dispatch, check, combine, check: one round.
  void round(int set, std::vector<RankInput> in, const CallMode& mode, const std::string& what) {
    upload(set, std::move(in));
    poison_all();
    const std::vector<DispatchOutput> outs = send_dispatch(set, mode);
    if (mode.hooks) call_hooks(outs, mode.side_stream_hooks);
    group_.synchronize();
    const std::string label = what + " [" + describe(p_) + ", " + describe(mode) + "]";
    check_dispatch(set, outs, mode.quantize, label);
    const std::vector<CombineOutput> comb = send_combine(set, outs, mode);
    if (mode.hooks) call_hooks(comb, mode.side_stream_hooks);
    group_.synchronize();
    for (int r = 0; r < R; ++r)
      if (!mode.own_out && !absent(r)) remember(r, comb[r].out);
    check_combine(set, comb, mode, label);
  }

  /// One round of input set 0 per mode, in order, each on fresh inputs (tokens() tokens a rank,
  /// routing drawn by `spec`), named `what` + "round i"; none after a round that failed.
  template <typename Tokens>
  void rounds(std::initializer_list<CallMode> modes, Tokens&& tokens, const RoutingSpec& spec,
              const std::string& what = "") {
    int i = 0;
    for (const CallMode& mode : modes) {
      if (test::state().failures_in_case > 0) return;
      round(0, inputs(tokens(), spec), mode, what + "round " + std::to_string(i++));
    }
  }

  /// Compares every rank's dispatch output with ref::ll_dispatch of input set `set`.
  void check_dispatch(int set, const std::vector<DispatchOutput>& outs, bool quantize,
                      const std::string& what) {
    const int G = H / kFp8Group;
    std::vector<ref::Routing> routing(R);
    std::vector<ref::Payload> payload(R);
    for (int r = 0; r < R; ++r) {
      const RankInput& in = inputs_[set][r];
      routing[r] = ref_routing(set, r);
      ref::Payload& pl = payload[r];
      if (quantize) {
        pl.row_bytes = H;
        pl.x.resize(static_cast<size_t>(in.tokens) * H);
        pl.x_scales.resize(static_cast<size_t>(in.tokens) * G);
        ref::quantize_fp8(in.x.data(), in.tokens, H, p_.scale_format, pl.x.data(),
                          pl.x_scales.data());
      } else {
        pl.row_bytes = 2 * H;
        pl.x.resize(in.x.size() * sizeof(uint16_t));
        if (!in.x.empty()) std::memcpy(pl.x.data(), in.x.data(), pl.x.size());
      }
    }
    const std::vector<ref::LlReceived> want = ref::ll_dispatch(shape(), M, routing, payload);
    const int64_t slots = int64_t{L} * R * M;
    const size_t row_bytes = quantize ? H : 2 * H;

    for (int r = 0; r < R; ++r) {
      if (absent(r)) continue;
      const DispatchOutput& o = outs[r];
      const std::string at = what + " rank " + std::to_string(r);
      CHECK(o.mode == Mode::kLowLatency) << at;
      CHECK(o.handle.valid()) << at;
      if (o.handle.valid()) {
        CHECK(o.handle.mode() == Mode::kLowLatency) << at;
        CHECK_EQ(o.handle.num_tokens(), inputs_[set][r].tokens) << at;
      }
      const bool shapes_ok =
          has_shape(o.recv_x, quantize ? DType::kFP8E4M3 : DType::kBF16, {L, int64_t{R} * M, H}) &&
          (!quantize || has_shape(o.recv_x_scales, DType::kF32, {L, int64_t{R} * M, G})) &&
          has_shape(o.recv_count, DType::kI32, {L}) &&
          has_shape(o.recv_src_info, DType::kI32, {L, int64_t{R} * M}) &&
          has_shape(o.recv_layout, DType::kI32, {L, R, 2});
      CHECK(shapes_ok) << at << ": recv_x " << o.recv_x.describe() << ", recv_x_scales "
                       << o.recv_x_scales.describe() << ", recv_count " << o.recv_count.describe()
                       << ", recv_src_info " << o.recv_src_info.describe() << ", recv_layout "
                       << o.recv_layout.describe();
      if (!shapes_ok) continue;

      std::string first;
      const auto count = test::download<int32_t>(o.recv_count);
      CHECK_EQ(test::count_mismatches(count, want[r].count, &first), 0)
          << at << " recv_count " << first;
      const auto layout = test::download<int32_t>(o.recv_layout);
      CHECK_EQ(test::count_mismatches(layout, want[r].layout, &first), 0)
          << at << " recv_layout " << first;

      const auto src = test::download<int32_t>(o.recv_src_info);
      const auto x = test::download<uint8_t>(o.recv_x, static_cast<int64_t>(o.recv_x.nbytes()));
      std::vector<float> scales;
      if (quantize) scales = test::download<float>(o.recv_x_scales);
      int64_t bad_src = 0, bad_x = 0, bad_scale = 0, valid = 0;
      std::string first_src, first_x, first_scale;
      for (int64_t s = 0; s < slots; ++s) {
        if (!want[r].slot_valid[s]) continue;
        ++valid;
        if (src[s] != want[r].src_token[s] && bad_src++ == 0)
          first_src = "slot " + std::to_string(s) + ": got " + std::to_string(src[s]) + ", want " +
                      std::to_string(want[r].src_token[s]);
        if (std::memcmp(&x[s * row_bytes], &want[r].x[s * row_bytes], row_bytes) != 0) {
          if (bad_x++ == 0) {
            size_t c = 0;
            while (x[s * row_bytes + c] == want[r].x[s * row_bytes + c]) ++c;
            first_x = "slot " + std::to_string(s) + " byte " + std::to_string(c) + ": got " +
                      std::to_string(x[s * row_bytes + c]) + ", want " +
                      std::to_string(want[r].x[s * row_bytes + c]);
          }
        }
        if (quantize &&
            std::memcmp(&scales[s * G], &want[r].x_scales[s * G], G * sizeof(float)) != 0 &&
            bad_scale++ == 0)
          first_scale = "slot " + std::to_string(s);
      }
      CHECK_EQ(bad_src, 0) << at << " recv_src_info " << first_src;
      CHECK_EQ(bad_x, 0) << at << " recv_x (of " << valid << " valid slots) " << first_x;
      CHECK_EQ(bad_scale, 0) << at << " recv_x_scales " << first_scale;
    }
  }

  /// Compares every rank's combine output with ref::ll_combine of input set `set`.
  void check_combine(int set, const std::vector<CombineOutput>& comb, const CallMode& mode,
                     const std::string& what) {
    std::vector<ref::Routing> routing(R);
    std::vector<std::vector<float>> weights(R);
    for (int r = 0; r < R; ++r) {
      routing[r] = ref_routing(set, r);
      weights[r] = absent(r) ? std::vector<float>{} : inputs_[set][r].w;
    }
    const auto want = ref::ll_combine(shape(), M, routing, weights, y_host_[set]);
    for (int r = 0; r < R; ++r) {
      if (absent(r)) continue;
      const std::string at = what + " rank " + std::to_string(r);
      const int64_t T = inputs_[set][r].tokens;
      const TensorView& out = comb[r].out;
      const bool shape_ok = has_shape(out, DType::kBF16, {T, H});
      CHECK(shape_ok) << at << ": combine out " << out.describe();
      if (mode.own_out && T > 0)
        CHECK(out.data == bufs_[set][r].out.get() + p_.view_offset)
            << at << ": out is not the caller's tensor";
      if (!shape_ok) continue;
      const auto got = test::download<uint16_t>(out, T * H);
      std::string first;
      CHECK_EQ(test::count_mismatches(got, want[r], &first), 0) << at << " combine out " << first;
    }
  }

  DispatchArgs dispatch_args(int set, int r) const {
    const Buffers& b = bufs_[set][r];
    const int64_t T = inputs_[set][r].tokens;
    DispatchArgs a;
    a.x = TensorView::contiguous(b.x.get() + p_.view_offset, DType::kBF16, {T, H}, kDevice);
    const size_t ro = routing_offset();
    a.topk_idx = p_.idx_i32
                     ? TensorView::contiguous(b.idx32.get() + ro, DType::kI32, {T, K}, kDevice)
                     : TensorView::contiguous(b.idx64.get() + ro, DType::kI64, {T, K}, kDevice);
    return a;
  }

  /// y (the test-owned [L, R*M, H] buffer) and topk_weights [T, K] of input set `set`.
  CombineArgs combine_args(int set, int r) const {
    const Buffers& b = bufs_[set][r];
    CombineArgs a;
    a.y = TensorView::contiguous(b.y.get() + p_.view_offset, DType::kBF16, {L, int64_t{R} * M, H},
                                 kDevice);
    a.topk_weights = TensorView::contiguous(b.w.get() + routing_offset(), DType::kF32,
                                            {inputs_[set][r].tokens, K}, kDevice);
    return a;
  }

  TensorView out_view(int set, int r) const {
    return TensorView::contiguous(bufs_[set][r].out.get() + p_.view_offset, DType::kBF16,
                                  {inputs_[set][r].tokens, H}, kDevice);
  }

  const LlParams p_;
  const int R, E, K, H, M, L;

 private:
  struct Buffers {
    DeviceBuffer<uint16_t> x;
    DeviceBuffer<int64_t> idx64;
    DeviceBuffer<int32_t> idx32;
    DeviceBuffer<float> w;
    DeviceBuffer<uint16_t> y;    // [L, R*M, H] combine input of this rank
    DeviceBuffer<uint16_t> out;  // [M, H] caller-owned combine output
  };
  struct Known {
    void* data;
    size_t bytes;
  };

  ref::Shape shape() const { return ref::Shape{R, E, K, H}; }
  /// Elements into their buffers at which the topk_idx and topk_weights views start.
  size_t routing_offset() const {
    return p_.offset_routing ? static_cast<size_t>(p_.view_offset) : 0;
  }

  void remember(int r, const TensorView& v) {
    if (!v.present() || !v.data || v.nbytes() == 0) return;
    for (Known& k : known_[r]) {
      if (k.data == v.data) {
        k.bytes = std::max(k.bytes, v.nbytes());
        return;
      }
    }
    known_[r].push_back({v.data, v.nbytes()});
  }
  void remember(int r, const DispatchOutput& o) {
    for (const TensorView* v :
         {&o.recv_x, &o.recv_x_scales, &o.recv_count, &o.recv_src_info, &o.recv_layout})
      remember(r, *v);
  }

  VirtualGroup group_;
  uint64_t out_mask_ = 0;  // ranks out of the group (masked by every rank, themselves too)
  uint64_t absent_ = 0;    // ranks that make no calls
  std::vector<cudaStream_t> side_streams_;  // one per rank, for hooks run off the call's stream
  std::mt19937_64 rng_;
  std::vector<Buffers> bufs_[kSets];
  std::vector<RankInput> inputs_[kSets];
  std::vector<std::vector<uint16_t>> y_host_[kSets];
  std::vector<std::vector<Known>> known_;
};

/// T = M on rank 0, T = 0 on the last rank (R > 1), random in between.
inline std::vector<int64_t> mixed_tokens(LlRig& rig) {
  std::vector<int64_t> t = rig.random_tokens();
  t[0] = rig.M;
  if (rig.R > 1) t[rig.R - 1] = 0;
  return t;
}

inline bool failed() {
  return test::state().failures_in_case > 0;
}

/// One captured graph per rank, destroyed with the set.
struct Graphs {
  explicit Graphs(int n) : graph(n, nullptr), exec(n, nullptr) {}
  ~Graphs() {
    for (size_t r = 0; r < graph.size(); ++r) {
      if (exec[r]) cudaGraphExecDestroy(exec[r]);
      if (graph[r]) cudaGraphDestroy(graph[r]);
    }
  }
  Graphs(const Graphs&) = delete;
  Graphs& operator=(const Graphs&) = delete;
  std::vector<cudaGraph_t> graph;
  std::vector<cudaGraphExec_t> exec;
};

/// Captures every rank's dispatch -> combine (T = M, `mode`'s options) in a CUDA graph, replays
/// the graphs `replays` times with new routing in the same input buffers, each replay checked
/// like a round, then checks two eager rounds after them.
inline void check_graph_replays(LlRig& rig, const CallMode& mode, int replays) {
  const LlParams& p = rig.p_;
  rig.upload(0, rig.inputs(std::vector<int64_t>(p.ranks, p.capacity), RoutingSpec{0.1}));

  Graphs graphs(p.ranks);
  std::vector<DispatchOutput> outs(p.ranks);
  std::vector<CombineOutput> combs(p.ranks);
  for (int r = 0; r < p.ranks; ++r) {
    cudaStream_t s = rig.comm(r).stream();
    MOECOMM_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    try {
      DispatchOptions dopt;
      dopt.quantize_fp8 = mode.quantize;
      dopt.return_recv_hook = mode.hooks;
      outs[r] = rig.comm(r).dispatch(rig.dispatch_args(0, r), dopt);
      if (mode.hooks) outs[r].hook();
      CombineOptions copt;
      copt.return_recv_hook = mode.hooks;
      copt.out = rig.out_view(0, r);
      combs[r] = rig.comm(r).combine(rig.combine_args(0, r), outs[r].handle, copt);
      if (mode.hooks) combs[r].hook();
    } catch (...) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(s, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    MOECOMM_CUDA_CHECK(cudaStreamEndCapture(s, &graphs.graph[r]));
    MOECOMM_CUDA_CHECK(cudaGraphInstantiate(&graphs.exec[r], graphs.graph[r], 0));
  }

  std::uniform_int_distribution<int64_t> pick(0, p.capacity);
  for (int replay = 0; replay < replays && !failed(); ++replay) {
    // Active tokens: M on rank 0, 0 on the last rank, random elsewhere; changes every replay.
    std::vector<RankInput> in(p.ranks);
    for (int r = 0; r < p.ranks; ++r) {
      RoutingSpec spec{0.1};
      spec.active = r == 0 ? p.capacity : r == p.ranks - 1 ? 0 : pick(rig.rng());
      in[r] = rig.random_input(p.capacity, spec);
    }
    rig.upload(0, std::move(in));
    rig.poison_all();
    for (int r = 0; r < p.ranks; ++r)
      MOECOMM_CUDA_CHECK(cudaGraphLaunch(graphs.exec[r], rig.comm(r).stream()));
    rig.group().synchronize();
    const std::string label =
        "replay " + std::to_string(replay) + " [" + describe(p) + ", " + describe(mode) + "]";
    rig.check_dispatch(0, outs, mode.quantize, label);
    rig.check_combine(0, combs, mode, label);
  }
  // Eager calls after the replays still agree with the graphs' sequence numbers and buffers.
  for (int round = 0; round < 2 && !failed(); ++round)
    rig.round(0, rig.inputs(mixed_tokens(rig), RoutingSpec{0.1}), CallMode{},
              "eager after graph " + std::to_string(round));
}

}  // namespace moecomm::test::ll
