// Bounded random fuzzing of the host code: Config::validate, config files (Config::load_file),
// tensor-view checks, the process-group config digest, and the host reference (random shapes
// and routings, -1 entries, duplicates and other corrupted inputs). Every input either passes,
// and then the documented invariants hold, or raises a clear InvalidArgument (the reference:
// std::invalid_argument) that names what is wrong; anything else is a failure. Built with the
// sanitizers by scripts/sanitize.sh, so memory errors and undefined behaviour fail too.
//
// Usage: fuzz_host [--seed S] [--cases N] [--seconds S] [--filter target]
// Each target runs N cases (default 2000), or fewer if it reaches its share of --seconds. Case i
// of a target draws from (seed, target, i) alone: "--seed S --filter T" replays a failure.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/harness.hpp"
#include "core/validate.hpp"
#include "moecomm/config.hpp"
#include "moecomm/error.hpp"
#include "moecomm/tensor.hpp"
#include "paths/regions.hpp"
#include "reference/reference.hpp"
#include "runtime/config_digest.hpp"
#include "runtime/device_context.hpp"

using namespace moecomm;

// The harness's checks format their message even when they pass; these only do on failure
// (the reference target makes millions of checks).
#define FUZZ_CHECK(cond) \
  if (cond) {            \
  } else                 \
    CHECK(cond)
#define FUZZ_EQ(a, b) \
  if ((a) == (b)) {   \
  } else              \
    CHECK_EQ(a, b)

namespace {

struct Options {
  long cases = 2000;
  double seconds = 60.0;  // for all targets together
};
Options& options() {
  static Options o;
  return o;
}
constexpr int kTargets = 5;

using Rng = std::mt19937_64;

/// Runs `one(rng, case)` for up to options().cases cases with a generator drawn from (seed,
/// salt, case); prints how many ran and how many inputs were refused.
template <typename F>
void fuzz(const char* target, uint64_t salt, F one) {
  const auto start = std::chrono::steady_clock::now();
  const double budget = options().seconds / kTargets;
  long ran = 0, refused = 0;
  for (long i = 0; i < options().cases; ++i) {
    std::seed_seq seq{test::seed(), salt, static_cast<uint64_t>(i)};
    Rng rng(seq);
    const int failures_before = test::state().failures_in_case;
    refused += one(rng) ? 0 : 1;
    ++ran;
    if (test::state().failures_in_case > failures_before) {
      std::printf("  %s: case %ld failed (replay: --seed %llu --filter %s)\n", target, i,
                  static_cast<unsigned long long>(test::seed()), target);
      break;
    }
    std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
    if (spent.count() > budget) break;
  }
  std::printf("  %s: %ld cases (%ld valid, %ld refused with a clear error), seed %llu\n", target,
              ran, ran - refused, refused, static_cast<unsigned long long>(test::seed()));
}

template <typename T>
T pick(Rng& rng, std::initializer_list<T> values) {
  std::uniform_int_distribution<size_t> u(0, values.size() - 1);
  return *(values.begin() + u(rng));
}
int64_t uniform(Rng& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}
bool coin(Rng& rng, double p = 0.5) {
  return std::uniform_real_distribution<double>(0.0, 1.0)(rng) < p;
}
bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

constexpr int kIntMin = std::numeric_limits<int>::min();
constexpr int kIntMax = std::numeric_limits<int>::max();

/// An int field's value: mostly plausible, sometimes at or past the edges.
int any_int(Rng& rng, int plausible_hi) {
  if (coin(rng, 0.7)) return static_cast<int>(uniform(rng, 1, plausible_hi));
  return pick<int>(rng, {kIntMin, -1, 0, 1, 2, 3, 7, 8, 32, 33, 128, 1024, 1025, 12288, 12289,
                         kIntMax, kIntMax - 7});
}

Config random_config(Rng& rng) {
  Config c;
  const int R = pick(rng, {1, 2, 4, 8});
  c.num_experts = coin(rng, 0.8) ? R * static_cast<int>(uniform(rng, 1, 32)) : any_int(rng, 512);
  c.hidden = coin(rng, 0.8) ? 128 * static_cast<int>(uniform(rng, 1, 64)) : any_int(rng, 8192);
  c.topk = coin(rng, 0.8) ? static_cast<int>(uniform(rng, 1, 8)) : any_int(rng, 40);
  c.max_tokens_per_rank = any_int(rng, 8192);
  c.mode = coin(rng, 0.95) ? pick(rng, {Mode::kLowLatency, Mode::kHighThroughput, Mode::kAuto})
                           : static_cast<Mode>(uniform(rng, -2, 9));
  c.num_sms = any_int(rng, 132);
  c.threads_per_block =
      coin(rng, 0.8) ? 32 * static_cast<int>(uniform(rng, 1, 32)) : any_int(rng, 2048);
  c.expert_alignment = any_int(rng, 128);
  c.enable_fp8 = coin(rng);
  c.scale_format = coin(rng, 0.95) ? pick(rng, {ScaleFormat::kFloat32, ScaleFormat::kPowerOfTwo})
                                   : static_cast<ScaleFormat>(uniform(rng, 2, 5));
  c.timeout_seconds = coin(rng, 0.8)
                          ? std::uniform_real_distribution<double>(1e-6, 3600.0)(rng)
                          : pick<double>(rng, {0.0, -1.0, 3600.0, 3600.0000000000005, 1e-300, 1e300,
                                               std::numeric_limits<double>::infinity(),
                                               std::numeric_limits<double>::quiet_NaN(),
                                               std::numeric_limits<double>::denorm_min()});
  c.max_recv_tokens =
      coin(rng, 0.6)
          ? 0
          : pick<int64_t>(rng, {-1, 1, 4096, int64_t{1} << 40, std::numeric_limits<int64_t>::max(),
                                std::numeric_limits<int64_t>::min()});
  c.low_latency_max_tokens = coin(rng, 0.6) ? 0 : any_int(rng, 1024);
  c.auto_low_latency_max_tokens = any_int(rng, 512);
  c.validate_inputs = coin(rng);
  return c;
}

// --- Config::validate ---------------------------------------------------------------------------
bool one_validate(Rng& rng) {
  const Config c = random_config(rng);
  const int R = coin(rng, 0.9) ? pick(rng, {1, 2, 3, 4, 8, 16, 64})
                               : pick(rng, {kIntMin, -1, 0, 65, 1000, kIntMax});
  try {
    c.validate(R);
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    FUZZ_CHECK(starts_with(m, "Config.") || starts_with(m, "Config:") ||
               starts_with(m, "num_ranks:"))
        << m;
    FUZZ_CHECK(m.find("expected") != std::string::npos) << m;
    return false;
  }
  // Passed: the documented ranges hold...
  FUZZ_CHECK(R >= 1 && R <= detail::kMaxRanks) << R;
  FUZZ_CHECK(c.num_experts >= 1 && c.num_experts % R == 0) << c.num_experts;
  FUZZ_CHECK(c.topk >= 1 && c.topk <= 32 && c.topk <= c.num_experts) << c.topk;
  FUZZ_CHECK(c.hidden >= 8 && c.hidden % 8 == 0 && (!c.enable_fp8 || c.hidden % 128 == 0))
      << c.hidden;
  FUZZ_CHECK(c.threads_per_block % 32 == 0 && c.threads_per_block <= 1024);
  FUZZ_CHECK(c.timeout_seconds > 0 && c.timeout_seconds <= 3600);
  FUZZ_CHECK(c.ll_capacity() >= 1 && c.local_experts(R) >= 1);
  // ...and no buffer size wraps: the symmetric buffer holds at least its largest region.
  for (bool separate : {false, true}) {
    const auto shape = detail::region_shape(c, R, separate);
    detail::RankArenas arenas(c);
    detail::DeviceContext ctx{};
    detail::claim_regions(c, shape, arenas, ctx);
    const detail::Arena& symmetric = arenas.symmetric;
    const long double ht = static_cast<long double>(ctx.ht.capacity) * c.hidden * 2;
    const long double ll =
        static_cast<long double>(c.local_experts(R)) * R * ctx.ll.capacity * c.hidden * 2;
    FUZZ_CHECK(static_cast<long double>(symmetric.size()) >= std::max(ht, ll))
        << "total " << symmetric.size() << " for " << c.to_text();
  }
  // A valid config survives a trip through a file.
  if (coin(rng, 0.1)) {
    const std::string path = "fuzz_host_validate.cfg";
    c.save_file(path);
    Config d;
    d.load_file(path);
    std::remove(path.c_str());
    FUZZ_EQ(d.to_text(), c.to_text());
    d.validate(R);
  }
  return true;
}

// --- Config::load_file --------------------------------------------------------------------------
std::string mutate_text(Rng& rng, std::string text) {
  static const char* tokens[] = {"",
                                 "-",
                                 "1e999",
                                 "nan",
                                 "0x10",
                                 "+3",
                                 " 12 ",
                                 "true",
                                 "auto",
                                 "pow2",
                                 "=",
                                 "#",
                                 "\r",
                                 "\n",
                                 "-0",
                                 "1.5",
                                 "99999999999999999999",
                                 "-9223372036854775808",
                                 "num_sms",
                                 "mode = auto",
                                 "hidden = 7168"};
  const int n = static_cast<int>(uniform(rng, 1, 3));
  for (int i = 0; i < n; ++i) {
    const size_t at = text.empty() ? 0 : static_cast<size_t>(uniform(rng, 0, text.size()));
    switch (uniform(rng, 0, 5)) {
      case 0:  // overwrite a byte with anything, NUL included
        if (at < text.size()) text[at] = static_cast<char>(uniform(rng, 0, 255));
        break;
      case 1:  // insert a token
        text.insert(at, tokens[uniform(rng, 0, std::size(tokens) - 1)]);
        break;
      case 2:  // delete a range
        text.erase(at, static_cast<size_t>(uniform(rng, 0, 20)));
        break;
      case 3: {  // replace the value of a line
        const size_t eq = text.find(" = ", at);
        if (eq == std::string::npos) break;
        const size_t end = text.find('\n', eq);
        text.replace(eq + 3, end == std::string::npos ? std::string::npos : end - eq - 3,
                     tokens[uniform(rng, 0, std::size(tokens) - 1)]);
        break;
      }
      case 4:  // truncate
        text.resize(at);
        break;
      default:  // a very long line
        text.insert(at, std::string(static_cast<size_t>(uniform(rng, 1, 5000)), '9'));
    }
  }
  return text;
}

bool one_load_file(Rng& rng) {
  std::string text = random_config(rng).to_text();
  if (coin(rng, 0.8)) text = mutate_text(rng, text);
  const std::string path = "fuzz_host_load.cfg";
  {
    FILE* f = std::fopen(path.c_str(), "wb");
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  Config c;
  bool ok = true;
  try {
    c.load_file(path);
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    FUZZ_CHECK(starts_with(m, "config file '" + path + "' line ")) << m;
    ok = false;
  }
  std::remove(path.c_str());
  if (!ok) return false;
  // Whatever a file could set, to_text writes in a form load_file reads back to the same config.
  const std::string again = "fuzz_host_again.cfg";
  c.save_file(again);
  Config d;
  d.load_file(again);
  std::remove(again.c_str());
  FUZZ_EQ(d.to_text(), c.to_text());
  return true;
}

// --- tensor views and check_tensor --------------------------------------------------------------
int64_t any_dim(Rng& rng) {
  if (coin(rng, 0.85)) return uniform(rng, 0, 9);
  return pick<int64_t>(rng, {-1, std::numeric_limits<int64_t>::min(), int64_t{1} << 31,
                             int64_t{1} << 62, std::numeric_limits<int64_t>::max()});
}

bool one_tensor(Rng& rng) {
  static int storage = 0;
  TensorView v;
  v.ndim = coin(rng, 0.85) ? static_cast<int>(uniform(rng, 0, 4)) : pick(rng, {-3, -1, 5, 7, 1000});
  v.dtype = coin(rng, 0.95) ? pick(rng, {DType::kBF16, DType::kBF16, DType::kFP8E4M3, DType::kF32,
                                         DType::kI32, DType::kI64, DType::kU8})
                            : static_cast<DType>(uniform(rng, 6, 255));
  for (int d = 0; d < kMaxTensorDims; ++d) v.shape[d] = any_dim(rng);
  int64_t stride = 1;  // contiguous strides where they fit, else anything
  for (int d = std::clamp(v.ndim, 0, kMaxTensorDims) - 1; d >= 0; --d) {
    v.strides[d] = coin(rng, 0.85) ? stride : any_dim(rng);
    if (v.shape[d] > 0 && stride < (int64_t{1} << 40) && v.shape[d] < (int64_t{1} << 20))
      stride *= v.shape[d];
  }
  v.device = pick(rng, {kHostDevice, 0, 1, 7});
  v.data = coin(rng, 0.9) ? &storage : nullptr;

  if (coin(rng, 0.1)) {  // the factory: at most kMaxTensorDims dimensions, any sizes
    const int64_t a = any_dim(rng), b = any_dim(rng), c = any_dim(rng);
    const int dims = static_cast<int>(uniform(rng, 0, 6));
    const std::initializer_list<int64_t> shapes[7] = {
        {}, {a}, {a, b}, {a, b, c}, {a, b, c, a}, {a, b, c, a, b}, {a, b, c, a, b, c}};
    try {
      v = TensorView::contiguous(v.data, v.dtype, shapes[dims], v.device);
      FUZZ_CHECK(dims <= kMaxTensorDims && v.ndim == dims);
    } catch (const InvalidArgument& e) {
      FUZZ_CHECK(dims > kMaxTensorDims) << e.what();
      FUZZ_CHECK(starts_with(e.what(), "shape: expected at most 4 dimensions")) << e.what();
    }
  }
  const std::string text = v.describe();  // defined for any view
  FUZZ_CHECK(!text.empty());
  (void)v.is_contiguous();
  const int64_t n = v.numel();
  FUZZ_CHECK(n >= -1) << n;

  // Half the specs are made to fit the view's shape, so that views also pass.
  const bool fit = coin(rng) && v.ndim >= 1 && v.ndim <= 4;
  const int spec_dims = fit ? v.ndim : static_cast<int>(uniform(rng, 1, 4));
  int64_t want[4];
  for (int d = 0; d < 4; ++d)
    want[d] = coin(rng, 0.5) ? detail::kAnyDim : fit ? v.shape[d] : uniform(rng, 0, 9);
  const std::initializer_list<int64_t> shapes[4] = {{want[0]},
                                                    {want[0], want[1]},
                                                    {want[0], want[1], want[2]},
                                                    {want[0], want[1], want[2], want[3]}};
  const detail::TensorSpec spec{
      "x", {DType::kBF16, DType::kFP8E4M3}, shapes[spec_dims - 1], "[spec]"};
  const int device = fit ? std::max(v.device, 0) : pick(rng, {0, 1});
  try {
    detail::check_tensor(v, spec, device);
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    FUZZ_CHECK(starts_with(m, "x: expected [spec] bf16 or fp8_e4m3, contiguous, on cuda:")) << m;
    FUZZ_CHECK(m.find(", got " + text) != std::string::npos) << m;
    return false;
  }
  FUZZ_EQ(v.ndim, spec_dims);
  FUZZ_CHECK(v.dtype == DType::kBF16 || v.dtype == DType::kFP8E4M3);
  FUZZ_CHECK(n >= 0 && v.is_contiguous() && v.device == device);
  for (int d = 0; d < spec_dims; ++d)
    FUZZ_CHECK(v.shape[d] >= 0 && (want[d] == detail::kAnyDim || want[d] == v.shape[d]));
  return true;
}

// --- the process-group config digest -----------------------------------------------------------
bool one_digest(Rng& rng) {
  const int R = static_cast<int>(uniform(rng, 1, 6));
  std::vector<Config> configs(R, random_config(rng));
  for (auto& c : configs)
    if (coin(rng, 0.2)) c = random_config(rng);
  std::vector<std::vector<uint8_t>> blocks;
  for (int r = 0; r < R; ++r)
    blocks.push_back(
        detail::encode_config_digest(configs[r], r, R, coin(rng, 0.97) ? "0.1.0" : "0.2.0"));
  const bool mutated = coin(rng, 0.3);
  if (mutated) {
    auto& b = blocks[uniform(rng, 0, R - 1)];
    for (int64_t i = uniform(rng, 1, 8); i > 0; --i)
      b[uniform(rng, 0, b.size() - 1)] = static_cast<uint8_t>(uniform(rng, 0, 255));
    if (coin(rng, 0.2)) b.resize(uniform(rng, 0, b.size()));
  }
  std::vector<std::span<const uint8_t>> spans(blocks.begin(), blocks.end());
  try {
    detail::check_config_digests(spans);
  } catch (const InvalidArgument& e) {
    const std::string m = e.what();
    FUZZ_CHECK(starts_with(m, "all_handles: ") || starts_with(m, "library version differs: ") ||
               starts_with(m, "group size differs: ") || starts_with(m, "Config."))
        << m;
    return false;
  }
  // Passed: unless bytes were changed, every rank has the same config.
  if (!mutated)
    for (int r = 1; r < R; ++r) FUZZ_EQ(configs[r].to_text(), configs[0].to_text());
  return true;
}

// --- the host reference -------------------------------------------------------------------------
using ref::bf16_t;

struct RefCase {
  ref::Shape shape;
  std::vector<ref::Routing> routing;
  std::vector<ref::Payload> payload;
  std::vector<std::vector<float>> weights;  // [T*K] per rank (for LL combine)
  std::vector<std::vector<int8_t>> x;       // small integers, the bf16 payload's values
  int alignment = 1;
  int max_tokens = 0;
};

RefCase random_ref_case(Rng& rng) {
  RefCase c;
  const int R = static_cast<int>(uniform(rng, 1, 8)), L = static_cast<int>(uniform(rng, 1, 4));
  const int E = R * L, K = static_cast<int>(uniform(rng, 1, std::min(E, 8)));
  const int H = pick(rng, {0, 8, 16, 128, 256});
  c.shape = ref::Shape{R, E, K, H};
  c.alignment = pick(rng, {1, 1, 2, 4, 128});
  const double drop = pick(rng, {0.0, 0.2, 0.5, 1.0});
  const bool hotspot = coin(rng, 0.2);
  const bool scales = H > 0 && H % 128 == 0 && coin(rng);
  const bool weights = coin(rng, 0.7);
  int max_t = 0;
  for (int r = 0; r < R; ++r) {
    const int64_t T = uniform(rng, 0, 12);
    max_t = std::max<int>(max_t, static_cast<int>(T));
    ref::Routing rt{T, std::vector<int64_t>(T * K, -1)};
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int64_t> pool(E);
      for (int e = 0; e < E; ++e) pool[e] = e;
      std::shuffle(pool.begin(), pool.end(), rng);
      if (hotspot) std::swap(pool[0], *std::find(pool.begin(), pool.end(), int64_t{0}));
      for (int k = 0; k < K; ++k) rt.topk_idx[t * K + k] = coin(rng, drop) ? -1 : pool[k];
    }
    c.routing.push_back(rt);
    ref::Payload p;
    p.row_bytes = 2 * H;
    std::vector<int8_t> xv(T * H);
    std::vector<bf16_t> xb(T * H);
    for (size_t i = 0; i < xv.size(); ++i) {
      xv[i] = static_cast<int8_t>(uniform(rng, -3, 3));
      xb[i] = ref::float_to_bf16(xv[i]);
    }
    p.x.resize(xb.size() * 2);
    if (!xb.empty()) std::memcpy(p.x.data(), xb.data(), p.x.size());
    if (scales)
      for (int64_t i = 0; i < T * (H / 128); ++i) p.x_scales.push_back(static_cast<float>(i + r));
    std::vector<float> w(T * K);
    for (float& f : w) f = 0.25f * static_cast<float>(uniform(rng, 0, 4));  // exact sums
    if (weights) p.topk_weights = w;
    c.weights.push_back(w);
    c.x.push_back(xv);
    c.payload.push_back(p);
  }
  c.max_tokens = max_t + static_cast<int>(uniform(rng, 0, 2));
  return c;
}

/// Corrupts a valid case in one way; returns the word the error must contain.
std::string corrupt(Rng& rng, RefCase& c) {
  const int R = c.shape.num_ranks, K = c.shape.topk, E = c.shape.num_experts;
  const int r = static_cast<int>(uniform(rng, 0, R - 1));
  ref::Routing& rt = c.routing[r];
  switch (uniform(rng, 0, 6)) {
    case 0:
      if (rt.topk_idx.empty()) break;
      rt.topk_idx[uniform(rng, 0, rt.topk_idx.size() - 1)] =
          pick<int64_t>(rng, {-2, E, E + 1000, std::numeric_limits<int64_t>::min(),
                              std::numeric_limits<int64_t>::max()});
      return "out of";
    case 1:
      for (int64_t t = 0; t < rt.num_tokens && K >= 2; ++t)
        if (rt.topk_idx[t * K] >= 0) {
          rt.topk_idx[t * K + uniform(rng, 1, K - 1)] = rt.topk_idx[t * K];
          return "repeats";
        }
      break;
    case 2:
      rt.topk_idx.push_back(0);
      return "topk_idx";
    case 3:  // a num_tokens whose product with K wraps
      rt.num_tokens = pick<int64_t>(
          rng, {-1, int64_t{1} << 62, std::numeric_limits<int64_t>::max(), rt.num_tokens + 1});
      return rt.num_tokens < 0 ? "num_tokens" : "topk_idx";
    case 4:
      if (coin(rng))
        c.routing.pop_back();
      else
        c.routing.push_back(c.routing[0]);
      return "routing";
    case 5:  // not a positive multiple of R
      c.shape.num_experts = R > 1 && coin(rng) ? E + 1 : pick(rng, {0, -E});
      return "num_experts";
    default:
      c.shape.topk = pick(rng, {0, -1});
      return "topk";
  }
  return "";
}

float bf16f(const std::vector<uint8_t>& bytes, size_t index) {
  bf16_t v;
  std::memcpy(&v, &bytes[index * 2], 2);
  return ref::bf16_to_float(v);
}

void check_layout(const RefCase& c, const std::vector<ref::LayoutResult>& lay) {
  const int R = c.shape.num_ranks, K = c.shape.topk, L = c.shape.local_experts();
  for (int s = 0; s < R; ++s) {
    const auto& rt = c.routing[s];
    std::vector<int32_t> per_rank(R, 0), per_expert(c.shape.num_experts, 0);
    for (int64_t t = 0; t < rt.num_tokens; ++t) {
      std::vector<uint8_t> in(R, 0);
      for (int k = 0; k < K; ++k)
        if (rt.topk_idx[t * K + k] >= 0) {
          in[rt.topk_idx[t * K + k] / L] = 1;
          ++per_expert[rt.topk_idx[t * K + k]];
        }
      for (int r = 0; r < R; ++r) {
        FUZZ_EQ(int{lay[s].is_token_in_rank[t * R + r]}, int{in[r]});
        per_rank[r] += in[r];
      }
    }
    FUZZ_CHECK(lay[s].num_tokens_per_rank == per_rank);
    FUZZ_CHECK(lay[s].num_tokens_per_expert == per_expert);
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < R; ++s) {
      FUZZ_EQ(lay[r].num_recv_tokens_per_rank[s], lay[s].num_tokens_per_rank[r]);
    }
  for (int r = 0; r < R; ++r)
    for (int le = 0; le < L; ++le) {
      int32_t sum = 0;
      for (int s = 0; s < R; ++s) sum += lay[s].num_tokens_per_expert[r * L + le];
      FUZZ_EQ(lay[r].num_recv_tokens_per_expert[le], sum);
    }
}

void check_ht(Rng& rng, const RefCase& c, const std::vector<ref::LayoutResult>& lay) {
  const int R = c.shape.num_ranks, K = c.shape.topk, L = c.shape.local_experts();
  const size_t H = c.shape.hidden;
  const auto recv = ref::ht_dispatch(c.shape, c.routing, c.payload, c.alignment);
  std::vector<std::vector<bf16_t>> y(R), bias(R);
  std::vector<std::vector<float>> recv_w(R);
  const bool weights = !c.payload[0].topk_weights.empty();
  for (int r = 0; r < R; ++r) {
    const auto& o = recv[r];
    // Rows ordered by source rank, then token: segment s holds exactly s's tokens sent to r.
    FUZZ_EQ(o.rank_prefix[0], 0);
    for (int s = 0; s < R; ++s) {
      FUZZ_EQ(o.rank_prefix[s + 1] - o.rank_prefix[s], lay[s].num_tokens_per_rank[r]);
      int64_t prev = -1;
      for (int32_t row = o.rank_prefix[s]; row < o.rank_prefix[s + 1]; ++row) {
        const int64_t t = o.src_token[row];
        FUZZ_CHECK(t > prev && t < c.routing[s].num_tokens && lay[s].is_token_in_rank[t * R + r])
            << "rank " << r << " row " << row;
        prev = t;
        for (size_t ch = 0; ch < H; ++ch)
          FUZZ_EQ(bf16f(o.x, row * H + ch), static_cast<float>(c.x[s][t * H + ch]));
        for (int k = 0; k < K; ++k) {
          const int64_t e = c.routing[s].topk_idx[t * K + k];
          const int64_t local = e >= 0 && e / L == r ? e - r * L : -1;
          FUZZ_EQ(o.topk_idx[row * K + k], local);
          if (weights)
            FUZZ_EQ(o.topk_weights[row * K + k],
                    local >= 0 ? c.payload[s].topk_weights[t * K + k] : 0.0f);
        }
      }
    }
    FUZZ_EQ(o.num_recv, o.rank_prefix[R]);
    for (int le = 0; le < L; ++le) {
      const int64_t raw = lay[r].num_recv_tokens_per_expert[le];
      FUZZ_EQ(o.num_recv_tokens_per_expert[le],
              (raw + c.alignment - 1) / c.alignment * c.alignment);
    }
    // Experts return the received rows unchanged: y = recv_x.
    y[r].resize(o.num_recv * H);
    if (!y[r].empty()) std::memcpy(y[r].data(), o.x.data(), y[r].size() * 2);
    recv_w[r] = o.topk_weights;
  }
  const bool with_bias = coin(rng);
  for (int s = 0; s < R && with_bias; ++s)
    for (int64_t i = 0; i < c.routing[s].num_tokens * static_cast<int64_t>(H); ++i)
      bias[s].push_back(ref::float_to_bf16(static_cast<float>(i % 3 - 1)));
  const auto out = ref::ht_combine(c.shape, c.routing, y, with_bias ? bias : decltype(bias){},
                                   weights ? recv_w : decltype(recv_w){});
  // combine(dispatch(x)) = sum over the destination ranks of x: n_dest(t) * x[t] (+ bias), exact
  // for these small integers.
  for (int s = 0; s < R; ++s)
    for (int64_t t = 0; t < c.routing[s].num_tokens; ++t) {
      int n = 0;
      for (int r = 0; r < R; ++r) n += lay[s].is_token_in_rank[t * R + r];
      for (size_t ch = 0; ch < H; ++ch) {
        float want = static_cast<float>(n * c.x[s][t * H + ch]);
        if (with_bias) want += static_cast<float>((t * H + ch) % 3) - 1.0f;
        FUZZ_EQ(ref::bf16_to_float(out[s].out[t * H + ch]), want) << "rank " << s << " token " << t;
      }
      for (int k = 0; k < K && weights; ++k) {
        const bool sent = c.routing[s].topk_idx[t * K + k] >= 0;
        FUZZ_EQ(out[s].combined_topk_weights[t * K + k],
                sent ? c.payload[s].topk_weights[t * K + k] : 0.0f);
      }
    }
}

void check_ll(const RefCase& c) {
  const int R = c.shape.num_ranks, K = c.shape.topk, L = c.shape.local_experts();
  const size_t H = c.shape.hidden, M = c.max_tokens;
  const auto recv = ref::ll_dispatch(c.shape, c.max_tokens, c.routing, c.payload);
  std::vector<std::vector<bf16_t>> y(R);
  for (int d = 0; d < R; ++d) {
    const auto& o = recv[d];
    for (int le = 0; le < L; ++le) {
      int32_t total = 0;
      for (int s = 0; s < R; ++s) {
        // Slots of source s for expert e: s's tokens that chose e, ascending, from s * M.
        std::vector<int32_t> tokens;
        const auto& rt = c.routing[s];
        for (int64_t t = 0; t < rt.num_tokens; ++t)
          for (int k = 0; k < K; ++k)
            if (rt.topk_idx[t * K + k] == d * L + le) tokens.push_back(static_cast<int32_t>(t));
        FUZZ_EQ(o.layout[(le * R + s) * 2], static_cast<int32_t>(s * M));
        FUZZ_EQ(o.layout[(le * R + s) * 2 + 1], static_cast<int32_t>(tokens.size()));
        for (size_t i = 0; i < M; ++i) {
          const size_t slot = (static_cast<size_t>(le) * R + s) * M + i;
          const bool used = i < tokens.size();
          FUZZ_EQ(int{o.slot_valid[slot]}, used ? 1 : 0);
          FUZZ_EQ(o.src_token[slot], used ? tokens[i] : -1);
          for (size_t ch = 0; ch < H && used; ++ch)
            FUZZ_EQ(bf16f(o.x, slot * H + ch), static_cast<float>(c.x[s][tokens[i] * H + ch]));
        }
        total += static_cast<int32_t>(tokens.size());
      }
      FUZZ_EQ(o.count[le], total);
    }
    y[d].resize(o.x.size() / 2);
    if (!y[d].empty()) std::memcpy(y[d].data(), o.x.data(), o.x.size());
  }
  // combine(dispatch(x)) = (sum of the token's weights over its selected experts) * x, exact here.
  const auto out = ref::ll_combine(c.shape, c.max_tokens, c.routing, c.weights, y);
  for (int s = 0; s < R; ++s)
    for (int64_t t = 0; t < c.routing[s].num_tokens; ++t) {
      float w = 0;
      for (int k = 0; k < K; ++k)
        if (c.routing[s].topk_idx[t * K + k] >= 0) w += c.weights[s][t * K + k];
      for (size_t ch = 0; ch < H; ++ch)
        FUZZ_EQ(ref::bf16_to_float(out[s][t * H + ch]), w * c.x[s][t * H + ch])
            << "rank " << s << " token " << t;
    }
}

bool one_reference(Rng& rng) {
  RefCase c = random_ref_case(rng);
  if (coin(rng, 0.25)) {
    const std::string word = corrupt(rng, c);
    if (!word.empty()) {
      // Every entry point that takes the corrupted part refuses it, naming it.
      auto refused = [&](const char* call, auto&& fn) {
        try {
          fn();
          FUZZ_CHECK(false) << call << " accepted an input with a bad " << word;
        } catch (const std::invalid_argument& e) {
          FUZZ_CHECK(std::string(e.what()).find(word) != std::string::npos)
              << call << ": '" << e.what() << "' lacks '" << word << "'";
        }
      };
      refused("layout", [&] { ref::layout(c.shape, c.routing); });
      refused("ht_dispatch", [&] { ref::ht_dispatch(c.shape, c.routing, c.payload, 1); });
      refused("ll_dispatch",
              [&] { ref::ll_dispatch(c.shape, c.max_tokens, c.routing, c.payload); });
      return false;
    }
  }
  const auto lay = ref::layout(c.shape, c.routing);
  check_layout(c, lay);
  check_ht(rng, c, lay);
  check_ll(c);
  return true;
}

}  // namespace

TEST_CASE("fuzz Config::validate") {
  fuzz("validate", 1, one_validate);
}
TEST_CASE("fuzz Config::load_file") {
  fuzz("load_file", 2, one_load_file);
}
TEST_CASE("fuzz check_tensor") {
  fuzz("check_tensor", 3, one_tensor);
}
TEST_CASE("fuzz config digests") {
  fuzz("digest", 4, one_digest);
}
TEST_CASE("fuzz the host reference") {
  fuzz("reference", 5, one_reference);
}

int main(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--cases") options().cases = std::atol(argv[i + 1]);
    if (std::string(argv[i]) == "--seconds") options().seconds = std::atof(argv[i + 1]);
  }
  std::printf("fuzz_host: up to %ld cases per target, %.0f s in all\n", options().cases,
              options().seconds);
  return moecomm::test::run_all(argc, argv);
}
