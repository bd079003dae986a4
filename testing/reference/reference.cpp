// Host reference of dispatch and combine (DESIGN.md, "Semantics"). Written for clarity, not
// speed: every loop follows the definition, and every reduction runs in the documented order.
#include "reference/reference.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace moecomm::ref {
namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument(what);
}

std::string rank_str(size_t r) {
  return " (rank " + std::to_string(r) + ")";
}

void check_shape(const Shape& shape) {
  if (shape.num_ranks <= 0) fail("num_ranks must be > 0, got " + std::to_string(shape.num_ranks));
  if (shape.num_experts <= 0 || shape.num_experts % shape.num_ranks != 0)
    fail("num_experts must be a positive multiple of num_ranks, got " +
         std::to_string(shape.num_experts) + " for " + std::to_string(shape.num_ranks) + " ranks");
  if (shape.topk <= 0) fail("topk must be > 0, got " + std::to_string(shape.topk));
  if (shape.hidden < 0) fail("hidden must be >= 0, got " + std::to_string(shape.hidden));
}

/// Validates one rank's routing: sizes, ids in [-1, E), no expert repeated within a token.
/// `where` names the rank in messages.
void check_one_routing(const Shape& shape, const Routing& rt, const std::string& where) {
  const int K = shape.topk;
  if (rt.num_tokens < 0) fail("num_tokens must be >= 0" + where);
  // Divide rather than multiply: num_tokens * K may wrap for a huge num_tokens.
  const size_t n = rt.topk_idx.size();
  if (n % K != 0 || n / K != static_cast<uint64_t>(rt.num_tokens))
    fail("topk_idx must have num_tokens * topk = " + std::to_string(rt.num_tokens) + " x " +
         std::to_string(K) + " entries, got " + std::to_string(n) + where);
  for (int64_t t = 0; t < rt.num_tokens; ++t) {
    for (int k = 0; k < K; ++k) {
      const int64_t e = rt.topk_idx[t * K + k];
      if (e < -1 || e >= shape.num_experts)
        fail("topk_idx entry out of [-1, " + std::to_string(shape.num_experts) +
             "): " + std::to_string(e) + " at token " + std::to_string(t) + where);
      for (int j = 0; j < k && e >= 0; ++j)
        if (rt.topk_idx[t * K + j] == e)
          fail("topk_idx repeats expert " + std::to_string(e) + " in token " + std::to_string(t) +
               where);
    }
  }
}

/// Validates the shape and every rank's routing.
void check_routing(const Shape& shape, const std::vector<Routing>& routing) {
  check_shape(shape);
  if (routing.size() != static_cast<size_t>(shape.num_ranks))
    fail("routing must have one entry per rank: " + std::to_string(routing.size()) + " for " +
         std::to_string(shape.num_ranks) + " ranks");
  for (size_t r = 0; r < routing.size(); ++r) check_one_routing(shape, routing[r], rank_str(r));
}

/// Which of the optional payload parts are present (the same on every rank).
struct PayloadParts {
  int row_bytes = 0;
  bool scales = false;
  bool weights = false;
  int scale_groups = 0;  ///< H / 128 when scales are present
};

/// Checks every rank's payload against its routing; a part present on one rank must be present
/// (sized to its tokens) on all.
PayloadParts check_payload(const Shape& shape, const std::vector<Routing>& routing,
                           const std::vector<Payload>& payload) {
  if (payload.size() != routing.size())
    fail("payload must have one entry per rank: " + std::to_string(payload.size()) + " for " +
         std::to_string(routing.size()) + " ranks");
  PayloadParts parts;
  parts.row_bytes = payload.empty() ? 0 : payload[0].row_bytes;
  for (const Payload& p : payload) {
    parts.scales = parts.scales || !p.x_scales.empty();
    parts.weights = parts.weights || !p.topk_weights.empty();
  }
  if (parts.row_bytes < 0) fail("row_bytes must be >= 0");
  if (parts.scales) {
    if (shape.hidden <= 0 || shape.hidden % kFp8Group != 0)
      fail("hidden must be a positive multiple of 128 when x_scales are given, got " +
           std::to_string(shape.hidden));
    parts.scale_groups = shape.hidden / kFp8Group;
  }
  for (size_t r = 0; r < payload.size(); ++r) {
    const Payload& p = payload[r];
    const size_t T = static_cast<size_t>(routing[r].num_tokens);
    if (p.row_bytes != parts.row_bytes)
      fail("row_bytes must be the same on every rank: " + std::to_string(p.row_bytes) + " vs " +
           std::to_string(parts.row_bytes) + rank_str(r));
    if (p.x.size() != T * parts.row_bytes)
      fail("x must have num_tokens * row_bytes bytes" + rank_str(r));
    if (parts.scales && p.x_scales.size() != T * parts.scale_groups)
      fail("x_scales must have num_tokens * hidden / 128 entries on every rank" + rank_str(r));
    if (parts.weights && p.topk_weights.size() != T * shape.topk)
      fail("topk_weights must have num_tokens * topk entries on every rank" + rank_str(r));
  }
  return parts;
}

/// Row of (source s, token t) in every rank's HT receive order: rows[s][t * R + r], -1 if t is
/// not sent to r. Also returns each rank's N.
struct HtRows {
  std::vector<std::vector<int64_t>> rows;
  std::vector<int64_t> num_recv;
};

HtRows ht_rows(const Shape& shape, const std::vector<LayoutResult>& lay,
               const std::vector<Routing>& routing) {
  const int R = shape.num_ranks;
  HtRows h;
  h.rows.resize(R);
  h.num_recv.assign(R, 0);
  for (int s = 0; s < R; ++s) {
    const int64_t T = routing[s].num_tokens;
    h.rows[s].assign(static_cast<size_t>(T) * R, -1);
    // Sources in ascending order, tokens ascending within a source: the receive order.
    for (int64_t t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r)
        if (lay[s].is_token_in_rank[t * R + r]) h.rows[s][t * R + r] = h.num_recv[r]++;
  }
  return h;
}

int64_t round_up(int64_t v, int64_t a) {
  return (v + a - 1) / a * a;
}

}  // namespace

std::vector<LayoutResult> layout(const Shape& shape, const std::vector<Routing>& routing) {
  check_routing(shape, routing);
  const int R = shape.num_ranks, E = shape.num_experts, K = shape.topk;
  const int L = shape.local_experts();
  std::vector<LayoutResult> out(R);
  for (int s = 0; s < R; ++s) {
    const Routing& rt = routing[s];
    LayoutResult& o = out[s];
    o.num_tokens_per_rank.assign(R, 0);
    o.num_tokens_per_expert.assign(E, 0);
    o.is_token_in_rank.assign(static_cast<size_t>(rt.num_tokens) * R, 0);
    for (int64_t t = 0; t < rt.num_tokens; ++t) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = rt.topk_idx[t * K + k];
        if (e < 0) continue;
        ++o.num_tokens_per_expert[e];
        o.is_token_in_rank[t * R + e / L] = 1;
      }
      for (int r = 0; r < R; ++r) o.num_tokens_per_rank[r] += o.is_token_in_rank[t * R + r];
    }
  }
  // Count exchange: what rank r receives is what every source s sends to r.
  for (int r = 0; r < R; ++r) {
    out[r].num_recv_tokens_per_rank.assign(R, 0);
    out[r].num_recv_tokens_per_expert.assign(L, 0);
    for (int s = 0; s < R; ++s) {
      out[r].num_recv_tokens_per_rank[s] = out[s].num_tokens_per_rank[r];
      for (int le = 0; le < L; ++le)
        out[r].num_recv_tokens_per_expert[le] += out[s].num_tokens_per_expert[r * L + le];
    }
  }
  return out;
}

std::vector<HtReceived> ht_dispatch(const Shape& shape, const std::vector<Routing>& routing,
                                    const std::vector<Payload>& payload, int expert_alignment) {
  const std::vector<LayoutResult> lay = layout(shape, routing);
  const PayloadParts parts = check_payload(shape, routing, payload);
  if (expert_alignment < 1)
    fail("expert_alignment must be >= 1, got " + std::to_string(expert_alignment));
  const int R = shape.num_ranks, K = shape.topk, L = shape.local_experts();
  const size_t rb = parts.row_bytes, G = parts.scale_groups;
  const HtRows h = ht_rows(shape, lay, routing);

  std::vector<HtReceived> out(R);
  for (int r = 0; r < R; ++r) {
    HtReceived& o = out[r];
    const size_t N = h.num_recv[r];
    o.num_recv = h.num_recv[r];
    o.x.resize(N * rb);
    if (parts.scales) o.x_scales.resize(N * G);
    o.topk_idx.resize(N * K);
    if (parts.weights) o.topk_weights.resize(N * K);
    o.src_token.resize(N);
    o.rank_prefix.assign(R + 1, 0);
    o.num_recv_tokens_per_expert.assign(L, 0);
  }
  for (int s = 0; s < R; ++s) {
    const Routing& rt = routing[s];
    const Payload& p = payload[s];
    for (int64_t t = 0; t < rt.num_tokens; ++t) {
      for (int r = 0; r < R; ++r) {
        const int64_t row = h.rows[s][t * R + r];
        if (row < 0) continue;
        HtReceived& o = out[r];
        if (rb) std::memcpy(&o.x[row * rb], &p.x[t * rb], rb);
        for (size_t g = 0; g < G; ++g) o.x_scales[row * G + g] = p.x_scales[t * G + g];
        for (int k = 0; k < K; ++k) {
          const int64_t e = rt.topk_idx[t * K + k];
          const int64_t local = (e >= 0 && e / L == r) ? e - static_cast<int64_t>(r) * L : -1;
          o.topk_idx[row * K + k] = local;
          if (parts.weights)
            o.topk_weights[row * K + k] = local >= 0 ? p.topk_weights[t * K + k] : 0.0f;
          if (local >= 0) ++o.num_recv_tokens_per_expert[local];
        }
        o.src_token[row] = static_cast<int32_t>(t);
        ++o.rank_prefix[s + 1];  // rows from s; prefix-summed below
      }
    }
  }
  for (HtReceived& o : out) {
    for (int s = 0; s < R; ++s) o.rank_prefix[s + 1] += o.rank_prefix[s];
    for (int32_t& c : o.num_recv_tokens_per_expert)
      c = static_cast<int32_t>(round_up(c, expert_alignment));
  }
  return out;
}

std::vector<HtCombined> ht_combine(const Shape& shape, const std::vector<Routing>& routing,
                                   const std::vector<std::vector<bf16_t>>& y,
                                   const std::vector<std::vector<bf16_t>>& bias,
                                   const std::vector<std::vector<float>>& recv_weights,
                                   int num_nodes) {
  const std::vector<LayoutResult> lay = layout(shape, routing);
  const int R = shape.num_ranks, K = shape.topk;
  if (num_nodes < 1 || R % num_nodes != 0) fail("num_nodes must divide the number of ranks");
  const int G = R / num_nodes;
  const size_t H = shape.hidden;
  const HtRows h = ht_rows(shape, lay, routing);

  if (y.size() != static_cast<size_t>(R)) fail("y must have one entry per rank");
  for (int r = 0; r < R; ++r)
    if (y[r].size() != h.num_recv[r] * H)
      fail("y must have num_recv * hidden = " + std::to_string(h.num_recv[r] * H) +
           " entries, got " + std::to_string(y[r].size()) + rank_str(r));
  // An empty outer vector means "none" as well as R empty vectors.
  if (!bias.empty() && bias.size() != static_cast<size_t>(R))
    fail("bias must be empty or have one entry per rank");
  for (size_t s = 0; s < bias.size(); ++s)
    if (!bias[s].empty() && bias[s].size() != routing[s].num_tokens * H)
      fail("bias must be empty or have num_tokens * hidden entries" + rank_str(s));
  // recv_weights: {} or R empty vectors mean "none"; otherwise every rank gives N_r * K. When no
  // rank received anything, R empty vectors are both, and count as given (all-zero output).
  bool weights = false;
  if (!recv_weights.empty()) {
    if (recv_weights.size() != static_cast<size_t>(R))
      fail("recv_weights must be empty or have one entry per rank");
    bool any = false, all_sized = true;
    for (int r = 0; r < R; ++r) {
      any = any || !recv_weights[r].empty();
      all_sized = all_sized && recv_weights[r].size() == static_cast<size_t>(h.num_recv[r]) * K;
    }
    if (any && !all_sized) fail("recv_weights must have num_recv * topk entries on every rank");
    weights = all_sized;
  }

  std::vector<HtCombined> out(R);
  for (int s = 0; s < R; ++s) {
    const int64_t T = routing[s].num_tokens;
    const bool has_bias = !bias.empty() && !bias[s].empty();
    HtCombined& o = out[s];
    o.out.resize(T * H);
    if (weights) o.combined_topk_weights.resize(T * K);
    for (int64_t t = 0; t < T; ++t) {
      // Sum over ranks r of node n ascending (f32), then over nodes ascending: one node's sum
      // is exact f32 with a single node, and rounded to bf16 before it crosses nodes otherwise.
      auto node_sum = [&](int n, auto value, bool* any) {
        float p = 0.0f;
        *any = false;
        for (int r = n * G; r < (n + 1) * G; ++r) {
          const int64_t row = h.rows[s][t * R + r];
          if (row >= 0) {
            p += value(r, row);
            *any = true;
          }
        }
        return p;
      };
      for (size_t c = 0; c < H; ++c) {
        float acc = 0.0f;
        for (int n = 0; n < num_nodes; ++n) {
          bool any = false;
          const float p = node_sum(
              n, [&](int r, int64_t row) { return bf16_to_float(y[r][row * H + c]); }, &any);
          if (num_nodes == 1)
            acc = p;
          else if (any)
            acc += bf16_to_float(float_to_bf16(p));
        }
        if (has_bias) acc += bf16_to_float(bias[s][t * H + c]);
        o.out[t * H + c] = float_to_bf16(acc);
      }
      for (int k = 0; k < K && weights; ++k) {
        float acc = 0.0f;
        for (int n = 0; n < num_nodes; ++n) {
          bool any = false;
          const float p = node_sum(
              n, [&](int r, int64_t row) { return recv_weights[r][row * K + k]; }, &any);
          if (num_nodes == 1)
            acc = p;
          else if (any)
            acc += p;
        }
        o.combined_topk_weights[t * K + k] = acc;
      }
    }
  }
  return out;
}

std::vector<int32_t> ll_positions(const Shape& shape, const Routing& routing) {
  check_shape(shape);
  check_one_routing(shape, routing, "");
  const int K = shape.topk;
  std::vector<int32_t> seen(shape.num_experts, 0);  // tokens so far that selected each expert
  std::vector<int32_t> pos(routing.topk_idx.size(), -1);
  for (int64_t t = 0; t < routing.num_tokens; ++t)
    for (int k = 0; k < K; ++k) {
      const int64_t e = routing.topk_idx[t * K + k];
      if (e >= 0) pos[t * K + k] = seen[e]++;
    }
  return pos;
}

namespace {

void check_ll_capacity(int max_tokens, const std::vector<Routing>& routing) {
  if (max_tokens < 0) fail("max_tokens must be >= 0, got " + std::to_string(max_tokens));
  for (size_t r = 0; r < routing.size(); ++r)
    if (routing[r].num_tokens > max_tokens)
      fail("num_tokens " + std::to_string(routing[r].num_tokens) + " exceeds max_tokens " +
           std::to_string(max_tokens) + rank_str(r));
}

}  // namespace

std::vector<LlReceived> ll_dispatch(const Shape& shape, int max_tokens,
                                    const std::vector<Routing>& routing,
                                    const std::vector<Payload>& payload) {
  check_routing(shape, routing);
  check_ll_capacity(max_tokens, routing);
  const PayloadParts parts = check_payload(shape, routing, payload);
  const int R = shape.num_ranks, K = shape.topk, L = shape.local_experts();
  const size_t M = max_tokens, slots = static_cast<size_t>(L) * R * M;
  const size_t rb = parts.row_bytes, G = parts.scale_groups;

  std::vector<LlReceived> out(R);
  for (LlReceived& o : out) {
    o.x.assign(slots * rb, 0);
    if (parts.scales) o.x_scales.assign(slots * G, 0.0f);
    o.count.assign(L, 0);
    o.src_token.assign(slots, -1);
    o.layout.assign(static_cast<size_t>(L) * R * 2, 0);
    for (int le = 0; le < L; ++le)
      for (int s = 0; s < R; ++s) o.layout[(le * R + s) * 2] = static_cast<int32_t>(s * M);
    o.slot_valid.assign(slots, 0);
  }
  for (int s = 0; s < R; ++s) {
    const Routing& rt = routing[s];
    const Payload& p = payload[s];
    const std::vector<int32_t> pos = ll_positions(shape, rt);
    for (int64_t t = 0; t < rt.num_tokens; ++t) {
      for (int k = 0; k < K; ++k) {
        const int64_t e = rt.topk_idx[t * K + k];
        if (e < 0) continue;
        const int d = static_cast<int>(e / L), le = static_cast<int>(e % L);
        const size_t slot = le * R * M + s * M + pos[t * K + k];
        LlReceived& o = out[d];
        if (rb) std::memcpy(&o.x[slot * rb], &p.x[t * rb], rb);
        for (size_t g = 0; g < G; ++g) o.x_scales[slot * G + g] = p.x_scales[t * G + g];
        o.src_token[slot] = static_cast<int32_t>(t);
        o.slot_valid[slot] = 1;
        ++o.count[le];
        ++o.layout[(le * R + s) * 2 + 1];
      }
    }
  }
  return out;
}

std::vector<std::vector<bf16_t>> ll_combine(const Shape& shape, int max_tokens,
                                            const std::vector<Routing>& routing,
                                            const std::vector<std::vector<float>>& topk_weights,
                                            const std::vector<std::vector<bf16_t>>& y) {
  check_routing(shape, routing);
  check_ll_capacity(max_tokens, routing);
  const int R = shape.num_ranks, K = shape.topk, L = shape.local_experts();
  const size_t M = max_tokens, H = shape.hidden;
  if (topk_weights.size() != static_cast<size_t>(R))
    fail("topk_weights must have one entry per rank");
  if (y.size() != static_cast<size_t>(R)) fail("y must have one entry per rank");
  for (int r = 0; r < R; ++r) {
    if (topk_weights[r].size() != routing[r].topk_idx.size())
      fail("topk_weights must have num_tokens * topk entries" + rank_str(r));
    if (y[r].size() != static_cast<size_t>(L) * R * M * H)
      fail("y must have local_experts * num_ranks * max_tokens * hidden entries" + rank_str(r));
  }

  std::vector<std::vector<bf16_t>> out(R);
  for (int s = 0; s < R; ++s) {
    const Routing& rt = routing[s];
    const std::vector<int32_t> pos = ll_positions(shape, rt);
    out[s].resize(rt.num_tokens * H);
    for (int64_t t = 0; t < rt.num_tokens; ++t) {
      for (size_t c = 0; c < H; ++c) {
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
          const int64_t e = rt.topk_idx[t * K + k];
          if (e < 0) continue;
          const int d = static_cast<int>(e / L), le = static_cast<int>(e % L);
          const size_t slot = le * R * M + s * M + pos[t * K + k];
          acc = std::fmaf(topk_weights[s][t * K + k], bf16_to_float(y[d][slot * H + c]), acc);
        }
        out[s][t * H + c] = float_to_bf16(acc);
      }
    }
  }
  return out;
}

}  // namespace moecomm::ref
