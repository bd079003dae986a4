// The host reference: dispatch and combine over R ranks with exactly DESIGN.md's semantics.
// It is the oracle of every GPU test. Everything is plain vectors, one entry per rank.
#pragma once

#include <cstdint>
#include <vector>

#include "moecomm/config.hpp"
#include "reference/numerics.hpp"

namespace moecomm::ref {

/// The shape of the problem shared by all ranks.
struct Shape {
  int num_ranks = 0;    ///< R
  int num_experts = 0;  ///< E (divisible by R)
  int topk = 0;         ///< K
  int hidden = 0;       ///< H
  int local_experts() const { return num_experts / num_ranks; }
};

/// One rank's routing: T tokens, topk_idx [T*K] with -1 for "no expert".
struct Routing {
  int64_t num_tokens = 0;
  std::vector<int64_t> topk_idx;
};

/// One rank's routing layout and the result of the count exchange.
struct LayoutResult {
  std::vector<int32_t> num_tokens_per_rank;         ///< [R] distinct tokens sent to r
  std::vector<int32_t> num_tokens_per_expert;       ///< [E]
  std::vector<uint8_t> is_token_in_rank;            ///< [T*R]
  std::vector<int32_t> num_recv_tokens_per_rank;    ///< [R] rows received from each source
  std::vector<int32_t> num_recv_tokens_per_expert;  ///< [L] (token, local expert) pairs received
};

/// Layout of every rank (the count exchange needs all of them).
std::vector<LayoutResult> layout(const Shape& shape, const std::vector<Routing>& routing);

/// Row payload of one rank: `row_bytes` bytes per token (bf16 or fp8 data), optional f32
/// scales [T * H/128] (fp8) and optional f32 weights [T*K].
struct Payload {
  int row_bytes = 0;
  std::vector<uint8_t> x;           ///< [T * row_bytes]
  std::vector<float> x_scales;      ///< [T * H/128] or empty
  std::vector<float> topk_weights;  ///< [T * K] or empty
};

/// HT dispatch output of one rank.
struct HtReceived {
  int64_t num_recv = 0;                             ///< N
  std::vector<uint8_t> x;                           ///< [N * row_bytes]
  std::vector<float> x_scales;                      ///< [N * H/128] (if the inputs had scales)
  std::vector<int64_t> topk_idx;                    ///< [N * K] local ids, -1 elsewhere
  std::vector<float> topk_weights;                  ///< [N * K] 0 where -1 (if inputs had weights)
  std::vector<int32_t> src_token;                   ///< [N]
  std::vector<int32_t> rank_prefix;                 ///< [R + 1]
  std::vector<int32_t> num_recv_tokens_per_expert;  ///< [L] padded to expert_alignment
};

/// HT dispatch: token t of rank s goes once to every distinct rank owning one of its experts;
/// receivers order rows by source rank, then source token.
std::vector<HtReceived> ht_dispatch(const Shape& shape, const std::vector<Routing>& routing,
                                    const std::vector<Payload>& payload, int expert_alignment);

/// HT combine output of one rank.
struct HtCombined {
  std::vector<bf16_t> out;                   ///< [T * H]
  std::vector<float> combined_topk_weights;  ///< [T * K] (if recv weights were given)
};

/// HT combine: out[t] = bf16( (sum over destination ranks r of t, ascending, of float(y_r[row]))
/// + float(bias[t]) ), accumulated in f32 starting from 0; tokens sent nowhere get bias (or 0).
/// y[r] is [N_r * H] bf16 in rank r's received-row order; bias[s] ([T*H]) and recv_weights[r]
/// ([N_r*K]) may be empty vectors. combined_topk_weights[t][k] = sum over r ascending.
/// num_nodes > 1 (ranks n*G .. n*G+G-1 form node n): the two-level sum of the internode path:
/// per node, the f32 sum over its ranks ascending, rounded to bf16 (the partial sum that crosses
/// the RDMA link), then out[t] = bf16(sum over nodes with a destination of t, ascending, of
/// those partials, + bias); weights likewise without the rounding.
std::vector<HtCombined> ht_combine(const Shape& shape, const std::vector<Routing>& routing,
                                   const std::vector<std::vector<bf16_t>>& y,
                                   const std::vector<std::vector<bf16_t>>& bias,
                                   const std::vector<std::vector<float>>& recv_weights,
                                   int num_nodes = 1);

/// LL dispatch output of one rank, capacity M per source rank.
struct LlReceived {
  std::vector<uint8_t> x;           ///< [L * R*M * row_bytes]; only valid slots are defined
  std::vector<float> x_scales;      ///< [L * R*M * H/128] (if scales)
  std::vector<int32_t> count;       ///< [L]
  std::vector<int32_t> src_token;   ///< [L * R*M]; -1 in unused slots
  std::vector<int32_t> layout;      ///< [L * R * 2]: (offset = s*M, count) per (e, s)
  std::vector<uint8_t> slot_valid;  ///< [L * R*M]
};

/// Position of (t, e) among rank s's tokens that selected expert e (ascending token order).
/// LL: rank s's token t for expert e lands in slot [e % L][s*M + position] of rank e / L.
std::vector<int32_t> ll_positions(const Shape& shape, const Routing& routing);  // [T*K], -1 if none

/// LL dispatch: one message per (token, selected expert), not deduplicated.
std::vector<LlReceived> ll_dispatch(const Shape& shape, int max_tokens,
                                    const std::vector<Routing>& routing,
                                    const std::vector<Payload>& payload);

/// LL combine: out[t] = bf16(acc), acc = 0; for k = 0..K-1 with idx >= 0:
/// acc = fmaf(w[t,k], float(y[slot of (t,k)]), acc). y[r] is [L * R*M * H] bf16 of rank r.
std::vector<std::vector<bf16_t>> ll_combine(const Shape& shape, int max_tokens,
                                            const std::vector<Routing>& routing,
                                            const std::vector<std::vector<float>>& topk_weights,
                                            const std::vector<std::vector<bf16_t>>& y);

}  // namespace moecomm::ref
