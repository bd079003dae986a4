// Host tests of the reference dispatch/combine: one case worked out by hand, then properties on
// seeded random routings (odd rank counts, empty ranks, every token on one expert, fp8 payloads)
// and input validation.
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/harness.hpp"
#include "common/random.hpp"
#include "reference/reference.hpp"

using namespace moecomm;
using namespace moecomm::ref;

namespace {

using I64 = std::vector<int64_t>;
using I32 = std::vector<int32_t>;
using F32 = std::vector<float>;
using U8 = std::vector<uint8_t>;
using Bf16 = std::vector<bf16_t>;

template <typename T>
std::vector<T> slice(const std::vector<T>& v, size_t begin, size_t n) {
  return std::vector<T>(v.begin() + begin, v.begin() + begin + n);
}

Bf16 to_bf16(const F32& v) {
  Bf16 out;
  for (float f : v) out.push_back(float_to_bf16(f));
  return out;
}

F32 to_float(const Bf16& v) {
  F32 out;
  for (bf16_t b : v) out.push_back(bf16_to_float(b));
  return out;
}

/// bf16 rows as a byte payload (row_bytes = 2 * H).
Payload bf16_payload(const Bf16& x, int hidden, const F32& weights) {
  Payload p;
  p.row_bytes = 2 * hidden;
  p.x.resize(x.size() * 2);
  if (!x.empty()) std::memcpy(p.x.data(), x.data(), p.x.size());
  p.topk_weights = weights;
  return p;
}

/// Reinterprets received bf16 row bytes as values.
Bf16 bytes_to_bf16(const U8& bytes) {
  Bf16 v(bytes.size() / 2);
  if (!v.empty()) std::memcpy(v.data(), bytes.data(), bytes.size());
  return v;
}

/// One bf16 ulp at |d| (the spacing of the binade that holds d).
double bf16_ulp(double d) {
  d = std::fabs(d);
  if (d < 0x1p-126) return 0x1p-133;
  return std::ldexp(1.0, std::ilogb(d) - 7);
}

// ---------------------------------------------------------------------------------------------
// The hand-worked case: R = 2, E = 4 (L = 2: rank 0 owns experts 0, 1; rank 1 owns 2, 3), K = 2,
// T = 3 per rank.
//   rank 0: t0 [0, 1]   both experts on rank 0
//           t1 [1, 3]   to both ranks
//           t2 [-1, 2]  rank 1 only, with a -1
//   rank 1: t0 [3, 0]   to both ranks
//           t1 [2, 3]   both experts on rank 1
//           t2 [-1, -1] sent nowhere
// ---------------------------------------------------------------------------------------------
Shape hand_shape(int hidden) {
  return Shape{2, 4, 2, hidden};
}

std::vector<Routing> hand_routing() {
  return {Routing{3, {0, 1, 1, 3, -1, 2}}, Routing{3, {3, 0, 2, 3, -1, -1}}};
}

/// Row payload of the hand case: 4 opaque bytes per token, byte i of (s, t) = 16 s + 4 t + i,
/// one scale per token (hidden 128) = 10 s + t, weights below.
std::vector<Payload> hand_payload() {
  std::vector<Payload> p(2);
  for (int s = 0; s < 2; ++s) {
    p[s].row_bytes = 4;
    for (int t = 0; t < 3; ++t) {
      for (int i = 0; i < 4; ++i) p[s].x.push_back(static_cast<uint8_t>(16 * s + 4 * t + i));
      p[s].x_scales.push_back(static_cast<float>(10 * s + t));
    }
  }
  p[0].topk_weights = {0.5f, 0.25f, 0.125f, 0.75f, 0.9f, 0.1f};
  p[1].topk_weights = {0.3f, 0.7f, 0.6f, 0.4f, 0.2f, 0.8f};
  return p;
}

/// The 4 bytes of (s, t) in the hand payload.
U8 hand_row(int s, int t) {
  U8 v;
  for (int i = 0; i < 4; ++i) v.push_back(static_cast<uint8_t>(16 * s + 4 * t + i));
  return v;
}

}  // namespace

TEST_CASE("hand case: layout and count exchange") {
  const auto lay = layout(hand_shape(128), hand_routing());
  CHECK_EQ(lay.size(), 2u);
  // Rank 0 sends t0, t1 to rank 0 and t1, t2 to rank 1.
  CHECK(lay[0].num_tokens_per_rank == I32({2, 2}));
  CHECK(lay[0].num_tokens_per_expert == I32({1, 2, 1, 1}));
  CHECK(lay[0].is_token_in_rank == U8({1, 0, 1, 1, 0, 1}));
  // Rank 1 sends t0 to rank 0 and t0, t1 to rank 1; t2 nowhere.
  CHECK(lay[1].num_tokens_per_rank == I32({1, 2}));
  CHECK(lay[1].num_tokens_per_expert == I32({1, 0, 1, 2}));
  CHECK(lay[1].is_token_in_rank == U8({1, 1, 0, 1, 0, 0}));
  // Count exchange.
  CHECK(lay[0].num_recv_tokens_per_rank == I32({2, 1}));
  CHECK(lay[1].num_recv_tokens_per_rank == I32({2, 2}));
  CHECK(lay[0].num_recv_tokens_per_expert == I32({2, 2}));  // experts 0, 1
  CHECK(lay[1].num_recv_tokens_per_expert == I32({2, 3}));  // experts 2, 3
}

TEST_CASE("hand case: HT dispatch") {
  const auto recv = ht_dispatch(hand_shape(128), hand_routing(), hand_payload(), 1);
  CHECK_EQ(recv.size(), 2u);

  // Rank 0 receives (s0, t0), (s0, t1), (s1, t0).
  const HtReceived& a = recv[0];
  CHECK_EQ(a.num_recv, 3);
  CHECK(a.src_token == I32({0, 1, 0}));
  CHECK(a.rank_prefix == I32({0, 2, 3}));
  CHECK(a.topk_idx == I64({0, 1, 1, -1, -1, 0}));
  CHECK(a.topk_weights == F32({0.5f, 0.25f, 0.125f, 0.0f, 0.0f, 0.7f}));
  CHECK(a.x_scales == F32({0.0f, 1.0f, 10.0f}));
  CHECK(slice(a.x, 0, 4) == hand_row(0, 0));
  CHECK(slice(a.x, 4, 4) == hand_row(0, 1));
  CHECK(slice(a.x, 8, 4) == hand_row(1, 0));
  CHECK(a.num_recv_tokens_per_expert == I32({2, 2}));

  // Rank 1 receives (s0, t1), (s0, t2), (s1, t0), (s1, t1).
  const HtReceived& b = recv[1];
  CHECK_EQ(b.num_recv, 4);
  CHECK(b.src_token == I32({1, 2, 0, 1}));
  CHECK(b.rank_prefix == I32({0, 2, 4}));
  CHECK(b.topk_idx == I64({-1, 1, -1, 0, 1, -1, 0, 1}));
  CHECK(b.topk_weights == F32({0.0f, 0.75f, 0.0f, 0.1f, 0.3f, 0.0f, 0.6f, 0.4f}));
  CHECK(b.x_scales == F32({1.0f, 2.0f, 10.0f, 11.0f}));
  CHECK(slice(b.x, 0, 4) == hand_row(0, 1));
  CHECK(slice(b.x, 4, 4) == hand_row(0, 2));
  CHECK(slice(b.x, 8, 4) == hand_row(1, 0));
  CHECK(slice(b.x, 12, 4) == hand_row(1, 1));
  CHECK(b.num_recv_tokens_per_expert == I32({2, 3}));

  // Alignment pads each per-expert count up.
  const auto a4 = ht_dispatch(hand_shape(128), hand_routing(), hand_payload(), 4);
  CHECK(a4[0].num_recv_tokens_per_expert == I32({4, 4}));
  CHECK(a4[1].num_recv_tokens_per_expert == I32({4, 4}));
  const auto a2 = ht_dispatch(hand_shape(128), hand_routing(), hand_payload(), 2);
  CHECK(a2[0].num_recv_tokens_per_expert == I32({2, 2}));
  CHECK(a2[1].num_recv_tokens_per_expert == I32({2, 4}));

  // Without scales and weights those outputs stay empty.
  auto bare = hand_payload();
  for (auto& p : bare) p.x_scales.clear(), p.topk_weights.clear();
  const auto c = ht_dispatch(hand_shape(128), hand_routing(), bare, 1);
  CHECK(c[1].x_scales.empty());
  CHECK(c[1].topk_weights.empty());
  CHECK(c[1].topk_idx == b.topk_idx);
}

TEST_CASE("hand case: HT combine") {
  // H = 1. Rank 0's three rows carry 1, 2, 4; rank 1's four rows 8, 16, 32, 64.
  const Shape shape = hand_shape(1);
  const std::vector<Bf16> y = {to_bf16({1, 2, 4}), to_bf16({8, 16, 32, 64})};
  const auto plain = ht_combine(shape, hand_routing(), y, {}, {});
  // Rank 0: t0 = row 0 of rank 0; t1 = 2 + 8; t2 = row 1 of rank 1.
  CHECK(to_float(plain[0].out) == F32({1, 10, 16}));
  // Rank 1: t0 = 4 + 32; t1 = 64; t2 went nowhere.
  CHECK(to_float(plain[1].out) == F32({36, 64, 0}));
  CHECK(plain[0].combined_topk_weights.empty());

  // Bias added after the sum; a token sent nowhere gets the bias alone.
  const std::vector<Bf16> bias = {to_bf16({0.5f, 0.5f, 0.5f}), to_bf16({1, 1, -3})};
  const auto biased = ht_combine(shape, hand_routing(), y, bias, {});
  CHECK(to_float(biased[0].out) == F32({1.5f, 10.5f, 16.5f}));
  CHECK(to_float(biased[1].out) == F32({37, 65, -3}));
  // Bias on one rank only.
  const auto half = ht_combine(shape, hand_routing(), y, {Bf16{}, bias[1]}, {});
  CHECK(to_float(half[0].out) == F32({1, 10, 16}));
  CHECK(to_float(half[1].out) == F32({37, 65, -3}));

  // Combining the dispatched weights gives back the weights, 0 where the id was -1.
  const auto recv = ht_dispatch(hand_shape(128), hand_routing(), hand_payload(), 1);
  const auto w =
      ht_combine(shape, hand_routing(), y, {}, {recv[0].topk_weights, recv[1].topk_weights});
  CHECK(w[0].combined_topk_weights == F32({0.5f, 0.25f, 0.125f, 0.75f, 0.0f, 0.1f}));
  CHECK(w[1].combined_topk_weights == F32({0.3f, 0.7f, 0.6f, 0.4f, 0.0f, 0.0f}));
}

TEST_CASE("hand case: LL positions and dispatch") {
  const Shape shape = hand_shape(128);
  const auto routing = hand_routing();
  CHECK(ll_positions(shape, routing[0]) == I32({0, 0, 1, 0, -1, 0}));
  CHECK(ll_positions(shape, routing[1]) == I32({0, 0, 0, 1, -1, -1}));

  // M = 3: each rank has 2 local experts x 2 sources x 3 slots = 12 slots; slot of
  // (source s, local expert le, position p) = 6 le + 3 s + p.
  const auto recv = ll_dispatch(shape, 3, routing, hand_payload());
  CHECK_EQ(recv.size(), 2u);
  // Rank 0: expert 0 <- (s0, t0), (s1, t0); expert 1 <- (s0, t0), (s0, t1).
  const LlReceived& a = recv[0];
  CHECK(a.count == I32({2, 2}));
  CHECK(a.src_token == I32({0, -1, -1, 0, -1, -1, 0, 1, -1, -1, -1, -1}));
  CHECK(a.slot_valid == U8({1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0}));
  CHECK(a.layout == I32({0, 1, 3, 1, 0, 2, 3, 0}));
  CHECK(slice(a.x, 0 * 4, 4) == hand_row(0, 0));
  CHECK(slice(a.x, 3 * 4, 4) == hand_row(1, 0));
  CHECK(slice(a.x, 6 * 4, 4) == hand_row(0, 0));
  CHECK(slice(a.x, 7 * 4, 4) == hand_row(0, 1));
  CHECK_EQ(a.x_scales[0], 0.0f);
  CHECK_EQ(a.x_scales[3], 10.0f);
  CHECK_EQ(a.x_scales[7], 1.0f);
  // Rank 1: expert 2 <- (s0, t2), (s1, t1); expert 3 <- (s0, t1), (s1, t0), (s1, t1).
  const LlReceived& b = recv[1];
  CHECK(b.count == I32({2, 3}));
  CHECK(b.src_token == I32({2, -1, -1, 1, -1, -1, 1, -1, -1, 0, 1, -1}));
  CHECK(b.slot_valid == U8({1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 0}));
  CHECK(b.layout == I32({0, 1, 3, 1, 0, 1, 3, 2}));
  CHECK(slice(b.x, 0 * 4, 4) == hand_row(0, 2));
  CHECK(slice(b.x, 3 * 4, 4) == hand_row(1, 1));
  CHECK(slice(b.x, 6 * 4, 4) == hand_row(0, 1));
  CHECK(slice(b.x, 9 * 4, 4) == hand_row(1, 0));
  CHECK(slice(b.x, 10 * 4, 4) == hand_row(1, 1));
  CHECK_EQ(b.x_scales[0], 2.0f);
  CHECK_EQ(b.x_scales[9], 10.0f);
  CHECK_EQ(b.x_scales[10], 11.0f);
}

TEST_CASE("hand case: LL combine") {
  // H = 1, M = 3; y at the used slots (see the LL dispatch case) holds powers of two.
  const Shape shape = hand_shape(1);
  std::vector<Bf16> y(2, Bf16(12, float_to_bf16(-1000.0f)));  // unused slots must not matter
  y[0][0] = float_to_bf16(1);
  y[0][3] = float_to_bf16(2);
  y[0][6] = float_to_bf16(4);
  y[0][7] = float_to_bf16(8);
  y[1][0] = float_to_bf16(16);
  y[1][3] = float_to_bf16(32);
  y[1][6] = float_to_bf16(64);
  y[1][9] = float_to_bf16(128);
  y[1][10] = float_to_bf16(256);
  const std::vector<F32> w = {{0.5f, 0.25f, 2.0f, 0.75f, 3.0f, 0.5f},
                              {0.25f, 1.5f, 1.0f, 0.5f, 7.0f, 9.0f}};
  const auto out = ll_combine(shape, 3, hand_routing(), w, y);
  // Rank 0: t0 = 0.5 * 1 + 0.25 * 4; t1 = 2 * 8 + 0.75 * 64; t2 = 0.5 * 16 (k = 0 is -1).
  CHECK(to_float(out[0]) == F32({1.5f, 64.0f, 8.0f}));
  // Rank 1: t0 = 0.25 * 128 + 1.5 * 2; t1 = 1 * 32 + 0.5 * 256; t2 = 0 (no expert).
  CHECK(to_float(out[1]) == F32({35.0f, 160.0f, 0.0f}));
}

TEST_CASE("LL combine uses a fused multiply-add chain") {
  // R = 1, E = 2, M = 1, H = 1; one token selects both experts (slots 0 and 1).
  // w = 1 + 2^-20 twice, y = 1 + 2^-7 and -(1 + 2^-7). The exact product is
  // 1 + 2^-7 + 2^-20 + 2^-27, so acc = fmaf(w, y0, 0) = 1 + 2^-7 + 2^-20 (2^-27 rounds off) and
  // fmaf(w, y1, acc) = -2^-27 exactly; a separate multiply and add would give 0.
  const Shape shape{1, 2, 2, 1};
  const std::vector<Routing> routing = {Routing{1, {0, 1}}};
  const std::vector<Bf16> y = {to_bf16({1.0f + 0x1p-7f, -(1.0f + 0x1p-7f)})};
  const std::vector<F32> w = {{1.0f + 0x1p-20f, 1.0f + 0x1p-20f}};
  const auto out = ll_combine(shape, 1, routing, w, y);
  CHECK_EQ(bf16_to_float(out[0][0]), -0x1p-27f);
}

namespace {

/// A random world: routing, bf16 activations and weights on every rank.
struct World {
  Shape shape;
  int max_tokens = 0;  ///< LL capacity M
  std::vector<Routing> routing;
  std::vector<Bf16> x;  ///< [T*H]
  std::vector<F32> w;   ///< [T*K]
};

/// small_ints: x holds integers in [-8, 8] (sums are exact), else random bf16 in [-4, 4].
World make_world(std::mt19937_64& rng, int R, int E, int K, int H, const std::vector<int>& T,
                 double drop, bool small_ints) {
  World w;
  w.shape = Shape{R, E, K, H};
  w.max_tokens = 2;
  for (int t : T) w.max_tokens = std::max(w.max_tokens, t + 1);  // leave unused slots
  std::uniform_int_distribution<int> ints(-8, 8);
  for (int s = 0; s < R; ++s) {
    w.routing.push_back(Routing{T[s], test::random_topk(rng, T[s], E, K, drop)});
    Bf16 x;
    if (small_ints) {
      for (int i = 0; i < T[s] * H; ++i) x.push_back(float_to_bf16(static_cast<float>(ints(rng))));
    } else {
      x = test::random_bf16(rng, static_cast<size_t>(T[s]) * H);
    }
    w.x.push_back(x);
    w.w.push_back(test::random_f32(rng, static_cast<size_t>(T[s]) * K));
  }
  return w;
}

std::vector<Payload> world_payload(const World& w) {
  std::vector<Payload> p;
  for (int s = 0; s < w.shape.num_ranks; ++s)
    p.push_back(bf16_payload(w.x[s], w.shape.hidden, w.w[s]));
  return p;
}

/// fp8 payload: x quantised per rank (row_bytes = H) with scales, no weights.
std::vector<Payload> world_fp8_payload(const World& w) {
  std::vector<Payload> p(w.shape.num_ranks);
  const int H = w.shape.hidden;
  for (int s = 0; s < w.shape.num_ranks; ++s) {
    const int64_t T = w.routing[s].num_tokens;
    p[s].row_bytes = H;
    p[s].x.resize(T * H);
    p[s].x_scales.resize(T * H / kFp8Group);
    quantize_fp8(w.x[s].data(), T, H, ScaleFormat::kFloat32, p[s].x.data(), p[s].x_scales.data());
  }
  return p;
}

bool has_expert_on(const World& w, int s, int64_t t, int r) {
  const int K = w.shape.topk, L = w.shape.local_experts();
  for (int k = 0; k < K; ++k) {
    const int64_t e = w.routing[s].topk_idx[t * K + k];
    if (e >= 0 && e / L == r) return true;
  }
  return false;
}

bool selects(const World& w, int s, int64_t t, int64_t e) {
  const int K = w.shape.topk;
  for (int k = 0; k < K; ++k)
    if (w.routing[s].topk_idx[t * K + k] == e) return true;
  return false;
}

bool has_scales(const std::vector<Payload>& pay) {
  for (const Payload& p : pay)
    if (!p.x_scales.empty()) return true;
  return false;
}

bool has_weights(const std::vector<Payload>& pay) {
  for (const Payload& p : pay)
    if (!p.topk_weights.empty()) return true;
  return false;
}

/// Checks HT dispatch from the receivers' side, against the routing directly: each receiver
/// holds exactly the tokens that have an expert on it, in (source, token) order, with the right
/// bytes, scales, local ids and weights. Returns row_of[r][s][t] (-1 if absent).
std::vector<std::vector<I64>> check_ht_dispatch(const World& w, const std::vector<Payload>& pay,
                                                const std::vector<HtReceived>& recv,
                                                const std::vector<LayoutResult>& lay) {
  const int R = w.shape.num_ranks, K = w.shape.topk, L = w.shape.local_experts();
  const size_t rb = pay[0].row_bytes;
  const size_t G = has_scales(pay) ? w.shape.hidden / 128 : 0;
  const bool weights = has_weights(pay);
  std::vector<std::vector<I64>> row_of(R, std::vector<I64>(R));
  CHECK_EQ(recv.size(), static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    const HtReceived& o = recv[r];
    CHECK_EQ(o.rank_prefix.size(), static_cast<size_t>(R + 1));
    CHECK_EQ(o.rank_prefix[0], 0);
    CHECK_EQ(o.rank_prefix[R], o.num_recv);
    CHECK_EQ(o.x.size(), o.num_recv * rb);
    CHECK_EQ(o.topk_idx.size(), static_cast<size_t>(o.num_recv * K));
    I32 per_expert(L, 0);
    for (int s = 0; s < R; ++s) {
      row_of[r][s].assign(w.routing[s].num_tokens, -1);
      int64_t expected = 0;
      for (int64_t t = 0; t < w.routing[s].num_tokens; ++t) expected += has_expert_on(w, s, t, r);
      CHECK_EQ(o.rank_prefix[s + 1] - o.rank_prefix[s], expected) << " r " << r << " s " << s;
      CHECK_EQ(lay[r].num_recv_tokens_per_rank[s], expected);
      CHECK_EQ(lay[s].num_tokens_per_rank[r], expected);
      int64_t prev = -1;
      for (int64_t i = o.rank_prefix[s]; i < o.rank_prefix[s + 1]; ++i) {
        const int64_t t = o.src_token[i];
        CHECK(t > prev && t < w.routing[s].num_tokens) << " row " << i << " of rank " << r;
        if (!(t > prev && t < w.routing[s].num_tokens)) return row_of;
        prev = t;
        row_of[r][s][t] = i;
        CHECK(has_expert_on(w, s, t, r));
        CHECK(std::memcmp(&o.x[i * rb], &pay[s].x[t * rb], rb) == 0) << " row " << i;
        for (size_t g = 0; g < G; ++g) CHECK_EQ(o.x_scales[i * G + g], pay[s].x_scales[t * G + g]);
        for (int k = 0; k < K; ++k) {
          const int64_t e = w.routing[s].topk_idx[t * K + k];
          const int64_t local = (e >= r * L && e < (r + 1) * L) ? e - r * L : -1;
          CHECK_EQ(o.topk_idx[i * K + k], local);
          if (weights)
            CHECK_EQ(o.topk_weights[i * K + k], local >= 0 ? pay[s].topk_weights[t * K + k] : 0.0f);
          if (local >= 0) ++per_expert[local];
        }
      }
    }
    CHECK(o.num_recv_tokens_per_expert == per_expert) << " rank " << r;
    CHECK(lay[r].num_recv_tokens_per_expert == per_expert) << " rank " << r;
  }
  return row_of;
}

/// Checks LL dispatch against the routing directly: per (local expert, source) the valid slots
/// are the tokens of the source that selected the expert, ascending, at s*M + position.
void check_ll_dispatch(const World& w, const std::vector<Payload>& pay,
                       const std::vector<LlReceived>& recv, const std::vector<LayoutResult>& lay) {
  const int R = w.shape.num_ranks, L = w.shape.local_experts(), M = w.max_tokens;
  const size_t rb = pay[0].row_bytes;
  const size_t G = has_scales(pay) ? w.shape.hidden / 128 : 0;
  for (int d = 0; d < R; ++d) {
    const LlReceived& o = recv[d];
    CHECK_EQ(o.src_token.size(), static_cast<size_t>(L) * R * M);
    CHECK_EQ(o.x.size(), static_cast<size_t>(L) * R * M * rb);
    for (int le = 0; le < L; ++le) {
      const int64_t e = static_cast<int64_t>(d) * L + le;
      int total = 0;
      for (int s = 0; s < R; ++s) {
        I32 tokens;
        for (int64_t t = 0; t < w.routing[s].num_tokens; ++t)
          if (selects(w, s, t, e)) tokens.push_back(static_cast<int32_t>(t));
        CHECK_EQ(o.layout[(le * R + s) * 2], s * M);
        CHECK_EQ(o.layout[(le * R + s) * 2 + 1], static_cast<int32_t>(tokens.size()));
        const I32 pos = ll_positions(w.shape, w.routing[s]);
        for (int p = 0; p < M; ++p) {
          const size_t slot = static_cast<size_t>(le) * R * M + s * M + p;
          if (p < static_cast<int>(tokens.size())) {
            const int32_t t = tokens[p];
            CHECK_EQ(o.src_token[slot], t);
            CHECK_EQ(static_cast<int>(o.slot_valid[slot]), 1);
            CHECK(std::memcmp(&o.x[slot * rb], &pay[s].x[t * rb], rb) == 0) << " slot " << slot;
            for (size_t g = 0; g < G; ++g)
              CHECK_EQ(o.x_scales[slot * G + g], pay[s].x_scales[t * G + g]);
            for (int k = 0; k < w.shape.topk; ++k)
              if (w.routing[s].topk_idx[t * w.shape.topk + k] == e)
                CHECK_EQ(pos[t * w.shape.topk + k], p);
          } else {
            CHECK_EQ(o.src_token[slot], -1);
            CHECK_EQ(static_cast<int>(o.slot_valid[slot]), 0);
          }
        }
        total += static_cast<int>(tokens.size());
      }
      CHECK_EQ(o.count[le], total);
      CHECK_EQ(lay[d].num_recv_tokens_per_expert[le], total);
    }
  }
}

/// Every property on one world: layout, HT dispatch (bf16 and fp8, several alignments), HT
/// combine (round trip and random y with bias against double), LL dispatch and combine.
void check_world(std::mt19937_64& rng, const World& w, bool small_ints) {
  const int R = w.shape.num_ranks, K = w.shape.topk, H = w.shape.hidden;
  const auto lay = layout(w.shape, w.routing);
  const auto pay = world_payload(w);

  // HT dispatch.
  const auto recv = ht_dispatch(w.shape, w.routing, pay, 1);
  const auto row_of = check_ht_dispatch(w, pay, recv, lay);
  for (int align : {3, 8}) {
    const auto aligned = ht_dispatch(w.shape, w.routing, pay, align);
    for (int r = 0; r < R; ++r)
      for (size_t le = 0; le < aligned[r].num_recv_tokens_per_expert.size(); ++le) {
        const int c = recv[r].num_recv_tokens_per_expert[le];
        CHECK_EQ(aligned[r].num_recv_tokens_per_expert[le], (c + align - 1) / align * align);
      }
  }
  const auto pay8 = world_fp8_payload(w);
  check_ht_dispatch(w, pay8, ht_dispatch(w.shape, w.routing, pay8, 1), lay);

  // HT combine of the dispatched rows: every destination rank adds x[t] once.
  std::vector<Bf16> y;
  std::vector<F32> recv_w;
  for (int r = 0; r < R; ++r) {
    y.push_back(bytes_to_bf16(recv[r].x));
    recv_w.push_back(recv[r].topk_weights);
  }
  const auto comb = ht_combine(w.shape, w.routing, y, {}, recv_w);
  for (int s = 0; s < R; ++s) {
    for (int64_t t = 0; t < w.routing[s].num_tokens; ++t) {
      int dests = 0;
      for (int r = 0; r < R; ++r) dests += has_expert_on(w, s, t, r);
      for (int c = 0; c < H; ++c) {
        const float x = bf16_to_float(w.x[s][t * H + c]);
        if (small_ints) {
          CHECK_EQ(comb[s].out[t * H + c], float_to_bf16(0.0f + dests * x))
              << " s " << s << " t " << t;
        } else {
          const double d = static_cast<double>(dests) * x;
          CHECK(std::fabs(bf16_to_float(comb[s].out[t * H + c]) - d) <= bf16_ulp(d));
        }
      }
      for (int k = 0; k < K; ++k) {
        const bool valid = w.routing[s].topk_idx[t * K + k] >= 0;
        CHECK_EQ(comb[s].combined_topk_weights[t * K + k], valid ? w.w[s][t * K + k] : 0.0f);
      }
    }
  }

  // HT combine of random rows plus a bias on every other rank, against a double sum.
  std::vector<Bf16> yr, bias(R);
  for (int r = 0; r < R; ++r) yr.push_back(test::random_bf16(rng, recv[r].num_recv * H));
  for (int s = 1; s < R; s += 2) bias[s] = test::random_bf16(rng, w.routing[s].num_tokens * H);
  const auto combr = ht_combine(w.shape, w.routing, yr, bias, {});
  for (int s = 0; s < R; ++s) {
    CHECK(combr[s].combined_topk_weights.empty());
    for (int64_t t = 0; t < w.routing[s].num_tokens; ++t) {
      for (int c = 0; c < H; ++c) {
        double d = 0, mag = 0;
        for (int r = 0; r < R; ++r) {
          const int64_t row = row_of[r][s][t];
          if (row < 0) continue;
          const double v = bf16_to_float(yr[r][row * H + c]);
          d += v, mag += std::fabs(v);
        }
        if (!bias[s].empty()) {
          const double v = bf16_to_float(bias[s][t * H + c]);
          d += v, mag += std::fabs(v);
        }
        const double got = bf16_to_float(combr[s].out[t * H + c]);
        CHECK(std::fabs(got - d) <= bf16_ulp(d) + 0x1p-20 * mag)
            << " s " << s << " t " << t << " c " << c << ": " << got << " vs " << d;
      }
    }
  }

  // LL dispatch (bf16 and fp8) and combine of the dispatched x with the weights.
  const auto ll = ll_dispatch(w.shape, w.max_tokens, w.routing, pay);
  check_ll_dispatch(w, pay, ll, lay);
  check_ll_dispatch(w, pay8, ll_dispatch(w.shape, w.max_tokens, w.routing, pay8), lay);
  std::vector<Bf16> yl;
  for (int r = 0; r < R; ++r) yl.push_back(bytes_to_bf16(ll[r].x));
  const auto out = ll_combine(w.shape, w.max_tokens, w.routing, w.w, yl);
  for (int s = 0; s < R; ++s) {
    CHECK_EQ(out[s].size(), static_cast<size_t>(w.routing[s].num_tokens) * H);
    for (int64_t t = 0; t < w.routing[s].num_tokens; ++t) {
      for (int c = 0; c < H; ++c) {
        const double x = bf16_to_float(w.x[s][t * H + c]);
        double d = 0, mag = 0;
        for (int k = 0; k < K; ++k) {
          if (w.routing[s].topk_idx[t * K + k] < 0) continue;
          d += w.w[s][t * K + k] * x;
          mag += std::fabs(w.w[s][t * K + k] * x);
        }
        const double got = bf16_to_float(out[s][t * H + c]);
        CHECK(std::fabs(got - d) <= bf16_ulp(d) + 0x1p-20 * mag)
            << " s " << s << " t " << t << " c " << c << ": " << got << " vs " << d;
      }
    }
  }
}

}  // namespace

TEST_CASE("random: exact integer round trips") {
  std::mt19937_64 rng(test::seed());
  check_world(rng, make_world(rng, 2, 8, 2, 128, {12, 9}, 0.0, true), true);
  check_world(rng, make_world(rng, 4, 16, 4, 128, {20, 7, 13, 1}, 0.1, true), true);
  check_world(rng, make_world(rng, 8, 32, 8, 128, {10, 10, 10, 10, 3, 0, 10, 10}, 0.2, true), true);
}

TEST_CASE("random: general bf16 against double") {
  std::mt19937_64 rng(test::seed() + 1);
  check_world(rng, make_world(rng, 2, 4, 2, 256, {17, 23}, 0.0, false), false);
  check_world(rng, make_world(rng, 4, 12, 3, 128, {9, 30, 0, 14}, 0.25, false), false);
}

TEST_CASE("random: odd rank counts") {
  std::mt19937_64 rng(test::seed() + 2);
  check_world(rng, make_world(rng, 3, 6, 2, 128, {11, 5, 8}, 0.1, true), true);
  check_world(rng, make_world(rng, 3, 9, 4, 128, {6, 13, 2}, 0.0, false), false);
  check_world(rng, make_world(rng, 5, 10, 3, 128, {4, 9, 1, 7, 12}, 0.15, true), true);
  check_world(rng, make_world(rng, 5, 15, 5, 128, {8, 0, 8, 3, 6}, 0.0, false), false);
  check_world(rng, make_world(rng, 1, 3, 2, 128, {9}, 0.2, true), true);  // one rank
}

TEST_CASE("random: ranks with no tokens") {
  std::mt19937_64 rng(test::seed() + 3);
  check_world(rng, make_world(rng, 3, 6, 2, 128, {0, 7, 0}, 0.0, true), true);
  check_world(rng, make_world(rng, 4, 8, 2, 128, {0, 0, 0, 0}, 0.0, true), true);
  // Every entry -1: nothing is sent anywhere.
  check_world(rng, make_world(rng, 2, 4, 2, 128, {5, 6}, 1.0, true), true);
  const World empty = make_world(rng, 4, 8, 2, 128, {0, 0, 0, 0}, 0.0, true);
  const auto recv = ht_dispatch(empty.shape, empty.routing, world_payload(empty), 4);
  for (const auto& o : recv) {
    CHECK_EQ(o.num_recv, 0);
    CHECK(o.rank_prefix == I32(5, 0));
    CHECK(o.num_recv_tokens_per_expert == I32(2, 0));
  }
}

TEST_CASE("random: every token on one expert") {
  std::mt19937_64 rng(test::seed() + 4);
  // R = 4, E = 8: expert 5 lives on rank 2 as local expert 1; K = 2 with the second slot -1.
  World w = make_world(rng, 4, 8, 2, 128, {6, 3, 0, 9}, 0.0, true);
  for (auto& rt : w.routing)
    for (int64_t t = 0; t < rt.num_tokens; ++t) rt.topk_idx[t * 2] = 5, rt.topk_idx[t * 2 + 1] = -1;
  check_world(rng, w, true);
  const auto recv = ht_dispatch(w.shape, w.routing, world_payload(w), 4);
  for (int r = 0; r < 4; ++r) {
    CHECK_EQ(recv[r].num_recv, r == 2 ? 18 : 0);
    CHECK(recv[r].num_recv_tokens_per_expert == (r == 2 ? I32({0, 20}) : I32({0, 0})));
  }
  CHECK(recv[2].rank_prefix == I32({0, 6, 9, 9, 18}));
  const auto ll = ll_dispatch(w.shape, w.max_tokens, w.routing, world_payload(w));
  CHECK(ll[2].count == I32({0, 18}));
  CHECK(ll[0].count == I32({0, 0}));
  CHECK(ll_positions(w.shape, w.routing[3]) ==
        I32({0, -1, 1, -1, 2, -1, 3, -1, 4, -1, 5, -1, 6, -1, 7, -1, 8, -1}));
}

TEST_CASE("bad inputs throw invalid_argument") {
  const Shape shape = hand_shape(128);
  const auto routing = hand_routing();
  const auto payload = hand_payload();
  using std::invalid_argument;

  CHECK_THROWS(layout(Shape{3, 4, 2, 128}, {routing[0], routing[1], routing[1]}), invalid_argument,
               "num_experts");
  CHECK_THROWS(layout(Shape{0, 4, 2, 128}, {}), invalid_argument, "num_ranks");
  CHECK_THROWS(layout(Shape{2, 4, 0, 128}, routing), invalid_argument, "topk");
  CHECK_THROWS(layout(shape, {routing[0]}), invalid_argument, "routing");
  auto bad = routing;
  bad[1].topk_idx[3] = 4;  // == E
  CHECK_THROWS(layout(shape, bad), invalid_argument, "out of");
  bad[1].topk_idx[3] = -2;
  CHECK_THROWS(layout(shape, bad), invalid_argument, "out of");
  CHECK_THROWS(ll_positions(shape, bad[1]), invalid_argument, "out of");
  bad = routing;
  bad[0].topk_idx.pop_back();
  CHECK_THROWS(layout(shape, bad), invalid_argument, "topk_idx");
  bad = routing;
  bad[0].topk_idx[1] = 0;  // token 0 selects expert 0 twice
  CHECK_THROWS(ht_dispatch(shape, bad, payload, 1), invalid_argument, "repeats");

  auto p = payload;
  p[1].x.pop_back();
  CHECK_THROWS(ht_dispatch(shape, routing, p, 1), invalid_argument, "x");
  p = payload;
  p[0].x_scales.pop_back();
  CHECK_THROWS(ht_dispatch(shape, routing, p, 1), invalid_argument, "x_scales");
  p = payload;
  p[1].topk_weights.clear();  // weights on rank 0 only
  CHECK_THROWS(ht_dispatch(shape, routing, p, 1), invalid_argument, "topk_weights");
  p = payload;
  p[1].row_bytes = 2;
  CHECK_THROWS(ht_dispatch(shape, routing, p, 1), invalid_argument, "row_bytes");
  CHECK_THROWS(ht_dispatch(hand_shape(100), routing, payload, 1), invalid_argument, "hidden");
  CHECK_THROWS(ht_dispatch(shape, routing, {payload[0]}, 1), invalid_argument, "payload");
  CHECK_THROWS(ht_dispatch(shape, routing, payload, 0), invalid_argument, "expert_alignment");

  const Shape h1 = hand_shape(1);
  const std::vector<Bf16> y = {Bf16(3), Bf16(4)};
  CHECK_THROWS(ht_combine(h1, routing, {Bf16(3), Bf16(5)}, {}, {}), invalid_argument, "y");
  CHECK_THROWS(ht_combine(h1, routing, {Bf16(3)}, {}, {}), invalid_argument, "y");
  CHECK_THROWS(ht_combine(h1, routing, y, {Bf16(2), Bf16{}}, {}), invalid_argument, "bias");
  CHECK_THROWS(ht_combine(h1, routing, y, {}, {F32(6), F32(7)}), invalid_argument, "recv_weights");

  // LL: T must fit the capacity M.
  CHECK_THROWS(ll_dispatch(shape, 2, routing, payload), invalid_argument, "max_tokens");
  CHECK_THROWS(ll_dispatch(shape, 3, routing, {payload[0]}), invalid_argument, "payload");
  const std::vector<F32> w = {F32(6), F32(6)};
  const std::vector<Bf16> yl = {Bf16(12), Bf16(12)};
  CHECK_THROWS(ll_combine(h1, 2, routing, w, yl), invalid_argument, "max_tokens");
  CHECK_THROWS(ll_combine(h1, 3, routing, {F32(6), F32(5)}, yl), invalid_argument, "topk_weights");
  CHECK_THROWS(ll_combine(h1, 3, routing, w, {Bf16(12), Bf16(11)}), invalid_argument, "y");
  (void)ll_combine(h1, 3, routing, w, yl);  // the well-formed call does not throw
}

int main(int argc, char** argv) {
  return moecomm::test::run_all(argc, argv);
}
