// A dispatched token's metadata in a destination rank's HT receive regions, written the same way
// by the intranode and the internode dispatch kernels (for the ranks of the sender's node).
#pragma once

#include <cstdint>

#include "paths/device_context.hpp"
#include "transport/signal.cuh"

namespace moecomm::ht {

/// Stores token t's metadata in row `row` of rank d's regions. Lane k < topk holds the token's
/// k-th expert `e` (a global id; -1 or out of range: none) and its weight `w`; it stores e's local
/// id at d, or -1 where e is not d's, and (with_weights) w, or 0 there. Lane 0 stores t as the
/// row's source token.
__device__ __forceinline__ void store_token_metadata(const detail::DeviceContext& ctx, int d,
                                                     int64_t row, int64_t t, int64_t e, float w,
                                                     bool with_weights, int lane) {
  const int K = ctx.topk, L = ctx.local_experts;
  if (lane < K) {
    const bool here = e >= 0 && e < ctx.num_experts && e / L == d;
    transport::peer_region<int64_t>(ctx, d, ctx.ht.topk_idx)[row * K + lane] =
        here ? e - static_cast<int64_t>(d) * L : -1;
    if (with_weights)
      transport::peer_region<float>(ctx, d, ctx.ht.topk_weights)[row * K + lane] = here ? w : 0.0f;
  }
  if (lane == 0)
    transport::peer_region<int32_t>(ctx, d, ctx.ht.src_token)[row] = static_cast<int32_t>(t);
}

}  // namespace moecomm::ht
