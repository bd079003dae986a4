// Fuzzing and soak on virtual ranks: random groups (R, E, K, H, mode) and random calls (T per
// rank, routing, bf16 or fp8, sizing, hooks, index width, weights, bias, views off a 16-byte
// boundary), each result compared element for element with the host reference after its outputs
// were poisoned. Then a long run of mixed calls on one 8-rank group, and groups made and
// destroyed in a loop with the device's free memory checked. Counts are printed.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/random.hpp"
#include "gpu/gpu_common.hpp"
#include "reference/reference.hpp"

using namespace moecomm;
using namespace moecomm::test;

namespace {

constexpr int kDevice = 0;
constexpr int kFp8Group = ref::kFp8Group;
constexpr int kPad = 16;  // elements of room for views that start inside their buffer

bool failed() {
  return test::state().failures_in_case > 0;
}

template <typename T>
void put(const DeviceBuffer<T>& dst, const std::vector<T>& src, int offset) {
  if (static_cast<size_t>(offset) + src.size() > dst.size())
    throw std::runtime_error("put: input larger than buffer");
  if (!src.empty())
    MOECOMM_CUDA_CHECK(
        cudaMemcpy(dst.get() + offset, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

template <typename T>
void expect_same(const std::vector<T>& got, const std::vector<T>& want, const std::string& what) {
  std::string first;
  const int64_t bad = count_mismatches(got, want, &first);
  CHECK(bad == 0) << what << ": " << bad << " of " << want.size() << " differ, first " << first;
}

/// One random call's options.
struct CallSpec {
  std::vector<int64_t> tokens;
  bool quantize = false;  // bf16 in, fp8 out (LL and HT), or HT fp8 passthrough (fp8_in)
  bool fp8_in = false;    // HT only
  bool hooks = false;     // LL only
  bool worst_case = false;
  bool i32 = false;
  bool weights = true;
  bool bias = false;
  int offset = 0;  // elements into the buffers for x, y, bias, out
  double drop = 0.1;
  int hot = -1;  // every token selects this expert

  std::string describe() const {
    std::string s = "T=[";
    for (size_t i = 0; i < tokens.size(); ++i) s += (i ? "," : "") + std::to_string(tokens[i]);
    s += "]";
    if (quantize) s += " quantize";
    if (fp8_in) s += " fp8_in";
    if (hooks) s += " hooks";
    if (worst_case) s += " worst_case";
    if (i32) s += " i32";
    if (!weights) s += " no_weights";
    if (bias) s += " bias";
    if (offset) s += " offset=" + std::to_string(offset);
    if (hot >= 0) s += " hot=" + std::to_string(hot);
    return s;
  }
};

/// A group with device buffers sized for its largest call, which runs one call and checks it.
class Rig {
 public:
  Rig(const Config& cfg, int ranks, uint64_t salt)
      : cfg_(cfg),
        R(ranks),
        E(cfg.num_experts),
        K(cfg.topk),
        H(cfg.hidden),
        L(cfg.num_experts / ranks),
        M(cfg.ll_capacity()),
        group_(cfg, ranks, {kDevice}),
        rng_(seed() * 0x9E3779B97F4A7C15ull + salt) {
    const size_t tmax = static_cast<size_t>(cfg.max_tokens_per_rank);
    const size_t cap = cfg.max_recv_tokens > 0 ? static_cast<size_t>(cfg.max_recv_tokens)
                                               : static_cast<size_t>(R) * tmax;
    const size_t ll_slots = cfg.mode == Mode::kHighThroughput ? 0 : static_cast<size_t>(L) * R * M;
    for (int r = 0; r < R; ++r) {
      Bufs b;
      b.x = DeviceBuffer<uint16_t>(tmax * H + kPad);
      b.x8 = DeviceBuffer<uint8_t>(tmax * H + kPad);
      b.scales = DeviceBuffer<float>(tmax * (H / kFp8Group) + 1);
      b.idx = DeviceBuffer<int64_t>(tmax * K + 1);
      b.idx32 = DeviceBuffer<int32_t>(tmax * K + 1);
      b.w = DeviceBuffer<float>(tmax * K + 1);
      b.y = DeviceBuffer<uint16_t>(std::max(cap * H, ll_slots * H) + kPad);
      b.bias = DeviceBuffer<uint16_t>(tmax * H + kPad);
      b.out = DeviceBuffer<uint16_t>(tmax * H + kPad);
      bufs_.push_back(std::move(b));
    }
    known_.resize(R);
  }

  VirtualGroup& group() { return group_; }
  std::mt19937_64& rng() { return rng_; }

  /// Runs dispatch and combine on every rank with `spec`; every output checked. Returns the
  /// number of calls made (dispatch and combine of each rank).
  int64_t run(const CallSpec& spec, const std::string& label) {
    const bool ll = spec.tokens.empty() ? false : is_ll(spec);
    const std::string what = label + " [R=" + std::to_string(R) + " E=" + std::to_string(E) +
                             " K=" + std::to_string(K) + " H=" + std::to_string(H) + " " +
                             (ll ? "LL" : "HT") + " " + spec.describe() + "]";
    draw_inputs(spec);
    poison_known();
    return ll ? run_ll(spec, what) : run_ht(spec, what);
  }

  bool is_ll(const CallSpec& spec) const {
    if (cfg_.mode != Mode::kAuto) return cfg_.mode == Mode::kLowLatency;
    return spec.tokens[0] <= cfg_.auto_low_latency_max_tokens;
  }

  const Config cfg_;
  const int R, E, K, H, L, M;

 private:
  struct Bufs {
    DeviceBuffer<uint16_t> x;
    DeviceBuffer<uint8_t> x8;
    DeviceBuffer<float> scales;
    DeviceBuffer<int64_t> idx;
    DeviceBuffer<int32_t> idx32;
    DeviceBuffer<float> w;
    DeviceBuffer<uint16_t> y;
    DeviceBuffer<uint16_t> bias;
    DeviceBuffer<uint16_t> out;
  };
  struct Known {
    void* data;
    size_t bytes;
  };

  ref::Shape shape() const { return ref::Shape{R, E, K, H}; }

  void draw_inputs(const CallSpec& spec) {
    routing_.assign(R, {});
    x_.assign(R, {});
    w_.assign(R, {});
    bias_.assign(R, {});
    payload_.assign(R, {});
    const int G = H / kFp8Group;
    for (int r = 0; r < R; ++r) {
      const int64_t T = spec.tokens[r];
      auto idx = random_topk(rng_, T, E, K, spec.drop);
      if (spec.hot >= 0)
        for (int64_t t = 0; t < T; ++t)
          if (std::find(&idx[t * K], &idx[t * K] + K, spec.hot) == &idx[t * K] + K)
            idx[t * K] = spec.hot;
      routing_[r] = ref::Routing{T, idx};
      x_[r] = random_bf16(rng_, static_cast<size_t>(T) * H);
      w_[r] = random_f32(rng_, static_cast<size_t>(T) * K, -1.0f, 1.0f);
      if (spec.bias) bias_[r] = random_bf16(rng_, static_cast<size_t>(T) * H);
      ref::Payload& p = payload_[r];
      if (spec.quantize || spec.fp8_in) {
        p.row_bytes = H;
        p.x.resize(static_cast<size_t>(T) * H);
        p.x_scales.resize(static_cast<size_t>(T) * G);
        ref::quantize_fp8(x_[r].data(), T, H, cfg_.scale_format, p.x.data(), p.x_scales.data());
      } else {
        p.row_bytes = 2 * H;
        p.x.resize(x_[r].size() * 2);
        if (!x_[r].empty()) std::memcpy(p.x.data(), x_[r].data(), p.x.size());
      }
      if (spec.weights) p.topk_weights = w_[r];
      Bufs& b = bufs_[r];
      put(b.x, x_[r], spec.offset);
      if (spec.fp8_in) {
        put(b.x8, p.x, spec.offset);
        put(b.scales, p.x_scales, 0);
      }
      put(b.idx, idx, 0);
      put(b.idx32, std::vector<int32_t>(idx.begin(), idx.end()), 0);
      put(b.w, w_[r], 0);
      if (spec.bias) put(b.bias, bias_[r], spec.offset);
      b.out.poison();
    }
  }

  DispatchArgs dispatch_args(const CallSpec& spec, int r) const {
    const Bufs& b = bufs_[r];
    const int64_t T = spec.tokens[r];
    DispatchArgs a;
    if (spec.fp8_in) {
      a.x = TensorView::contiguous(b.x8.get() + spec.offset, DType::kFP8E4M3, {T, H}, kDevice);
      a.x_scales = TensorView::contiguous(b.scales.get(), DType::kF32, {T, H / kFp8Group}, kDevice);
    } else {
      a.x = TensorView::contiguous(b.x.get() + spec.offset, DType::kBF16, {T, H}, kDevice);
    }
    a.topk_idx = spec.i32 ? TensorView::contiguous(b.idx32.get(), DType::kI32, {T, K}, kDevice)
                          : TensorView::contiguous(b.idx.get(), DType::kI64, {T, K}, kDevice);
    if (spec.weights)
      a.topk_weights = TensorView::contiguous(b.w.get(), DType::kF32, {T, K}, kDevice);
    return a;
  }

  TensorView out_view(const CallSpec& spec, int r) const {
    return TensorView::contiguous(bufs_[r].out.get() + spec.offset, DType::kBF16,
                                  {spec.tokens[r], H}, kDevice);
  }

  void remember(int r, const TensorView& v) {
    if (!v.present() || !v.data || v.nbytes() == 0) return;
    for (Known& k : known_[r])
      if (k.data == v.data) {
        k.bytes = std::max(k.bytes, v.nbytes());
        return;
      }
    known_[r].push_back({v.data, v.nbytes()});
  }

  void poison_known() {
    for (auto& list : known_)
      for (const Known& k : list) MOECOMM_CUDA_CHECK(cudaMemset(k.data, kPoison, k.bytes));
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  }

  int64_t run_ht(const CallSpec& spec, const std::string& what) {
    std::vector<DispatchOutput> out(R);
    group_.parallel_for([&](int r) {
      DispatchOptions o;
      o.sizing = spec.worst_case ? Sizing::kWorstCase : Sizing::kExact;
      o.quantize_fp8 = spec.quantize;
      out[r] = group_[r].dispatch(dispatch_args(spec, r), o);
    });
    group_.synchronize();
    const auto want = ref::ht_dispatch(shape(), routing_, payload_, cfg_.expert_alignment);
    const int G = H / kFp8Group;
    const bool fp8 = spec.quantize || spec.fp8_in;
    for (int r = 0; r < R; ++r) {
      const DispatchOutput& o = out[r];
      const std::string at = what + " rank " + std::to_string(r);
      const int64_t n = download<int32_t>(o.num_recv_tokens_device)[0];
      CHECK_EQ(n, want[r].num_recv) << at;
      if (!spec.worst_case) CHECK_EQ(o.num_recv_tokens, want[r].num_recv) << at;
      if (n != want[r].num_recv) continue;
      const int row_bytes = fp8 ? H : 2 * H;
      expect_same(download<uint8_t>(o.recv_x, n * row_bytes), want[r].x, at + " recv_x");
      if (fp8)
        expect_same(download<float>(o.recv_x_scales, n * G), want[r].x_scales, at + " scales");
      expect_same(download<int64_t>(o.recv_topk_idx, n * K), want[r].topk_idx, at + " topk_idx");
      if (spec.weights)
        expect_same(download<float>(o.recv_topk_weights, n * K), want[r].topk_weights,
                    at + " topk_weights");
      expect_same(download<int32_t>(o.recv_src_token, n), want[r].src_token, at + " src_token");
      expect_same(download<int32_t>(o.num_recv_tokens_per_expert),
                  want[r].num_recv_tokens_per_expert, at + " per expert");
      for (const TensorView* v :
           {&o.recv_x, &o.recv_x_scales, &o.recv_topk_idx, &o.recv_topk_weights, &o.recv_src_token})
        remember(r, *v);
    }
    if (failed()) return R;

    std::vector<std::vector<uint16_t>> y(R);
    std::vector<std::vector<float>> recv_w(R);
    std::vector<CombineOutput> comb(R);
    for (int r = 0; r < R; ++r) {
      y[r] = random_bf16(rng_, static_cast<size_t>(want[r].num_recv) * H);
      put(bufs_[r].y, y[r], spec.offset);
      if (spec.weights) recv_w[r] = want[r].topk_weights;
    }
    for (int r = 0; r < R; ++r) {
      const int64_t N = want[r].num_recv, T = spec.tokens[r];
      CombineArgs a;
      a.y = TensorView::contiguous(bufs_[r].y.get() + spec.offset, DType::kBF16, {N, H}, kDevice);
      if (spec.weights)
        a.recv_topk_weights =
            TensorView::contiguous(out[r].recv_topk_weights.data, DType::kF32, {N, K}, kDevice);
      if (spec.bias)
        a.bias = TensorView::contiguous(bufs_[r].bias.get() + spec.offset, DType::kBF16, {T, H},
                                        kDevice);
      CombineOptions o;
      if (r % 2 == 0) o.out = out_view(spec, r);  // caller's output on even ranks
      comb[r] = group_[r].combine(a, out[r].handle, o);
    }
    group_.synchronize();
    const auto want_out = ref::ht_combine(
        shape(), routing_, y, spec.bias ? bias_ : std::vector<std::vector<uint16_t>>{},
        spec.weights ? recv_w : std::vector<std::vector<float>>{});
    for (int r = 0; r < R; ++r) {
      const std::string at = what + " rank " + std::to_string(r);
      expect_same(download<uint16_t>(comb[r].out), want_out[r].out, at + " combine out");
      if (spec.weights)
        expect_same(download<float>(comb[r].combined_topk_weights),
                    want_out[r].combined_topk_weights, at + " combined weights");
      if (r % 2) remember(r, comb[r].out);
      remember(r, comb[r].combined_topk_weights);
    }
    return 2 * R;
  }

  int64_t run_ll(const CallSpec& spec, const std::string& what) {
    std::vector<DispatchOutput> out(R);
    for (int r = 0; r < R; ++r) {
      DispatchOptions o;
      o.quantize_fp8 = spec.quantize;
      o.return_recv_hook = spec.hooks;
      out[r] = group_[r].dispatch(dispatch_args(spec, r), o);
    }
    if (spec.hooks)
      for (int r = 0; r < R; ++r) out[r].hook();
    group_.synchronize();
    const auto want = ref::ll_dispatch(shape(), M, routing_, payload_);
    const int64_t slots = int64_t{L} * R * M;
    const int G = H / kFp8Group;
    const size_t row_bytes = spec.quantize ? H : 2 * H;
    for (int r = 0; r < R; ++r) {
      const DispatchOutput& o = out[r];
      const std::string at = what + " rank " + std::to_string(r);
      expect_same(download<int32_t>(o.recv_count), want[r].count, at + " recv_count");
      expect_same(download<int32_t>(o.recv_layout), want[r].layout, at + " recv_layout");
      const auto src = download<int32_t>(o.recv_src_info);
      const auto x = download<uint8_t>(o.recv_x, static_cast<int64_t>(o.recv_x.nbytes()));
      std::vector<float> scales;
      if (spec.quantize) scales = download<float>(o.recv_x_scales);
      int64_t bad = 0;
      for (int64_t s = 0; s < slots; ++s) {
        if (!want[r].slot_valid[s]) continue;
        bad += src[s] != want[r].src_token[s];
        bad += std::memcmp(&x[s * row_bytes], &want[r].x[s * row_bytes], row_bytes) != 0;
        if (spec.quantize)
          bad += std::memcmp(&scales[s * G], &want[r].x_scales[s * G], G * sizeof(float)) != 0;
      }
      CHECK_EQ(bad, 0) << at << ": valid slots that differ";
      for (const TensorView* v :
           {&o.recv_x, &o.recv_x_scales, &o.recv_count, &o.recv_src_info, &o.recv_layout})
        remember(r, *v);
    }
    if (failed()) return R;

    std::vector<std::vector<uint16_t>> y(R);
    std::vector<CombineOutput> comb(R);
    for (int r = 0; r < R; ++r) {
      y[r] = random_bf16(rng_, static_cast<size_t>(slots) * H);
      put(bufs_[r].y, y[r], spec.offset);
    }
    for (int r = 0; r < R; ++r) {
      CombineArgs a;
      a.y = TensorView::contiguous(bufs_[r].y.get() + spec.offset, DType::kBF16, {L, slots / L, H},
                                   kDevice);
      a.topk_weights =
          TensorView::contiguous(bufs_[r].w.get(), DType::kF32, {spec.tokens[r], K}, kDevice);
      CombineOptions o;
      o.return_recv_hook = spec.hooks;
      if (r % 2 == 0) o.out = out_view(spec, r);
      comb[r] = group_[r].combine(a, out[r].handle, o);
    }
    if (spec.hooks)
      for (int r = 0; r < R; ++r) comb[r].hook();
    group_.synchronize();
    const auto want_out = ref::ll_combine(shape(), M, routing_, w_, y);
    for (int r = 0; r < R; ++r) {
      expect_same(download<uint16_t>(comb[r].out), want_out[r],
                  what + " rank " + std::to_string(r) + " combine out");
      if (r % 2) remember(r, comb[r].out);
    }
    return 2 * R;
  }

  VirtualGroup group_;
  std::mt19937_64 rng_;
  std::vector<Bufs> bufs_;
  std::vector<std::vector<Known>> known_;
  std::vector<ref::Routing> routing_;
  std::vector<std::vector<uint16_t>> x_, bias_;
  std::vector<std::vector<float>> w_;
  std::vector<ref::Payload> payload_;
};

/// A random call for `rig`: T per rank within what its mode allows.
CallSpec random_call(Rig& rig, std::mt19937_64& rng, bool ll) {
  const Config& c = rig.cfg_;
  auto coin = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  CallSpec s;
  int64_t lo = 0, hi = c.max_tokens_per_rank;
  if (c.mode == Mode::kAuto) {
    if (ll)
      hi = std::min<int64_t>(c.auto_low_latency_max_tokens, rig.M);
    else
      lo = c.auto_low_latency_max_tokens + 1;
  } else if (ll) {
    hi = std::min<int64_t>(hi, rig.M);
  }
  s.tokens.resize(rig.R);
  for (auto& t : s.tokens) t = std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  if (lo == 0 && coin(0.3)) s.tokens[rng() % rig.R] = 0;
  const bool fp8_ok = c.enable_fp8;
  s.quantize = fp8_ok && coin(0.35);
  s.fp8_in = !ll && fp8_ok && !s.quantize && coin(0.2);
  s.hooks = ll && coin(0.4);
  s.worst_case = !ll && coin(0.4);
  s.i32 = coin(0.3);
  s.weights = ll || coin(0.7);
  s.bias = !ll && coin(0.3);
  s.offset = coin(0.2) ? 1 + static_cast<int>(rng() % 7) : 0;
  s.drop = coin(0.5) ? 0.0 : 0.3;
  if (coin(0.1)) s.hot = static_cast<int>(rng() % rig.E);
  return s;
}

}  // namespace

TEST_CASE("fuzz: random groups and calls against the reference") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 17);
  const int sms = device_sm_count(kDevice);
  int64_t groups = 0, calls = 0;
  for (int g = 0; g < 40 && !failed(); ++g) {
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    const int R = pick(1, 8);
    Config c;
    c.num_experts = R * pick(1, 6);
    c.topk = pick(1, std::min(c.num_experts, 12));
    c.hidden = pick(0, 2) == 0 ? 128 * pick(1, 6) : 8 * pick(1, 100);
    c.enable_fp8 = c.hidden % 128 == 0;
    c.max_tokens_per_rank = pick(1, 96);
    const int mode = pick(0, 2);
    c.mode = mode == 0 ? Mode::kHighThroughput : mode == 1 ? Mode::kLowLatency : Mode::kAuto;
    if (c.mode == Mode::kAuto) c.auto_low_latency_max_tokens = pick(1, c.max_tokens_per_rank);
    if (c.mode != Mode::kHighThroughput && pick(0, 1)) c.low_latency_max_tokens = pick(1, 96);
    c.num_sms = std::min(pick(1, 8), sms / R);
    c.threads_per_block = 32 * pick(1, 16);
    c.expert_alignment = pick(0, 3) == 0 ? pick(2, 64) : 1;
    c.scale_format = pick(0, 1) ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32;
    c.validate_inputs = true;
    c.timeout_seconds = 20.0;
    Rig rig(c, R, 100 + g);
    ++groups;
    for (int i = 0; i < 6 && !failed(); ++i) {
      bool ll = c.mode == Mode::kLowLatency;
      if (c.mode == Mode::kAuto)
        ll = c.auto_low_latency_max_tokens >= c.max_tokens_per_rank || pick(0, 1) == 0;
      calls += rig.run(random_call(rig, rng, ll),
                       "group " + std::to_string(g) + " call " + std::to_string(i));
    }
  }
  std::printf("  fuzz: %lld groups, %lld calls checked\n", static_cast<long long>(groups),
              static_cast<long long>(calls));
}

TEST_CASE("soak: 10,000 mixed calls on 8 virtual ranks, every result checked") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 23);
  Config c;
  c.mode = Mode::kAuto;
  c.num_experts = 64;
  c.topk = 6;
  c.hidden = 128;
  c.max_tokens_per_rank = 40;
  c.auto_low_latency_max_tokens = 16;
  c.num_sms = 4;
  c.threads_per_block = 256;
  c.validate_inputs = true;
  Rig rig(c, 8, 7);
  int64_t calls = 0, ll_rounds = 0, ht_rounds = 0;
  while (calls < 10000 && !failed()) {
    const bool ll = rng() % 2 == 0;
    calls += rig.run(random_call(rig, rng, ll), "soak call " + std::to_string(calls));
    ++(ll ? ll_rounds : ht_rounds);
  }
  std::printf("  soak: %lld calls checked (%lld LL and %lld HT rounds of dispatch + combine)\n",
              static_cast<long long>(calls), static_cast<long long>(ll_rounds),
              static_cast<long long>(ht_rounds));
}

TEST_CASE("100 groups made and destroyed: device memory stays flat") {
  REQUIRE_GPU();
  std::mt19937_64 rng(seed() + 29);
  Config c;
  c.mode = Mode::kAuto;
  c.num_experts = 840;  // divisible by every group size 1..8
  c.topk = 4;
  c.hidden = 256;
  c.max_tokens_per_rank = 32;
  c.auto_low_latency_max_tokens = 8;
  c.num_sms = 2;
  c.threads_per_block = 128;
  size_t free_first = 0, total = 0, free_now = 0;
  for (int i = 0; i < 100 && !failed(); ++i) {
    {
      Rig rig(c, 1 + i % 8, 300 + i);
      rig.run(random_call(rig, rng, i % 2 == 0), "group " + std::to_string(i));
    }
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
    MOECOMM_CUDA_CHECK(cudaMemGetInfo(&free_now, &total));
    if (i == 7) free_first = free_now;  // after every group size has been made once
  }
  const double lost_mib =
      (static_cast<double>(free_first) - static_cast<double>(free_now)) / (1 << 20);
  std::printf("  100 groups: free device memory after the 8th %.1f MiB, after the 100th %.1f MiB\n",
              free_first / 1048576.0, free_now / 1048576.0);
  CHECK(lost_mib < 16.0) << "device memory fell by " << lost_mib << " MiB over 92 groups";
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
