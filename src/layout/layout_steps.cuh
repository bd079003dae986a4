// The routing layout as device steps that any kernel of a rank can run with all of its blocks:
// bitmaps, then prefix counts, then (HT) the count exchange, with grid barriers in between. The
// layout kernel runs them alone (get_layout, exact sizing); HT dispatch and LL send run them as
// their first steps, so that a call costs one launch instead of three. LL needs the expert
// bitmaps alone: where they fit, every block builds its own copy in shared memory instead.
#pragma once

#include <cstdint>

#include "layout/bitmap.cuh"
#include "layout/layout.hpp"
#include "transport/barrier.cuh"
#include "transport/signal.cuh"

namespace moecomm::layout {

namespace steps {

using detail::DeviceContext;
using detail::DeviceErrorKind;
using detail::FlagKind;
using detail::Phase;

using device::kFullMask;
inline constexpr int kScanPrefetch = 8;    // words per lane in flight while scanning a row
inline constexpr int kExpertPrefetch = 8;  // topk entries per lane in flight while building

/// One warp builds word w (tokens 32w .. 32w+31) of every bitmap row. It owns that column, so it
/// needs no atomics: the column is built in `column` (E words of shared memory), then written out.
__device__ inline void build_word(const DeviceContext& ctx, const TopkInput& topk, bool validate,
                                  int64_t w, uint32_t* column, int lane) {
  const int E = ctx.num_experts, L = ctx.local_experts, K = ctx.topk, R = ctx.num_ranks;
  const int W = ctx.words;
  const int64_t T = topk.num_tokens;
  const int64_t t = w * 32 + lane;
  const bool has_token = t < T;

  for (int e = lane; e < E; e += 32) column[e] = 0;
  __syncwarp();

  uint64_t rank_mask = 0;
  const uint64_t masked = transport::masked_peers(ctx);  // their experts count as -1
  for (int k0 = 0; k0 < K; k0 += kExpertPrefetch) {
    int64_t chosen[kExpertPrefetch];  // this step's loads are all in flight before any is used
#pragma unroll
    for (int j = 0; j < kExpertPrefetch; ++j)
      chosen[j] =
          has_token && k0 + j < K ? device::load_index(topk.data, topk.is_i64, t * K + k0 + j) : -1;
#pragma unroll
    for (int j = 0; j < kExpertPrefetch; ++j) {
      const int k = k0 + j;
      if (k >= K) break;  // warp-uniform
      int64_t e = chosen[j];
      if (e < -1 || e >= E) {
        transport::record_error(ctx, DeviceErrorKind::kExpertOutOfRange, -1, Phase::kNone, 0, 0, e,
                                t, k);
        e = -1;
      }
      if (e >= 0 && ((masked >> (e / L)) & 1ull)) e = -1;  // a masked rank's expert: not an error
      // The token's own bit in the column is set iff an earlier k chose the same expert.
      if (e >= 0 && ((column[e] >> lane) & 1u)) {
        if (validate)
          transport::record_error(ctx, DeviceErrorKind::kDuplicateExpert, -1, Phase::kNone, 0, 0, e,
                                  t, k);
        e = -1;
      }
      __syncwarp();  // every lane has read the column before this step writes it
      const unsigned same = __match_any_sync(kFullMask, static_cast<int>(e));
      if (e >= 0) {
        rank_mask |= 1ull << (e / L);
        // The lowest lane of each group of equal experts writes the group's bits; groups of one
        // k-step name distinct experts, and steps are ordered by __syncwarp.
        if (lane == __ffs(same) - 1) column[e] |= same;
      }
      __syncwarp();
    }
  }
  for (int e = lane; e < E; e += 32)
    ctx.layout.expert_bitmap[static_cast<int64_t>(e) * W + w] = column[e];
  if (has_token) ctx.layout.token_rank_mask[t] = rank_mask;
  for (int r = 0; r < R; ++r) {
    const bool in_rank = (rank_mask >> r) & 1ull;
    const unsigned bits = __ballot_sync(kFullMask, in_rank);
    if (lane == 0) ctx.layout.rank_bitmap[static_cast<int64_t>(r) * W + w] = bits;
    if (has_token) ctx.layout.is_token_in_rank[t * R + r] = in_rank ? 1 : 0;
  }
  __syncwarp();  // the column is reused for the warp's next word
}

/// Every thread of one block: builds the expert bitmaps of all of this rank's tokens in `bits`
/// (the block's shared memory, E rows of (T + 31) / 32 words), reading every topk entry once. No
/// other block is waited for. Entries are judged as build_word judges them (out of range or a
/// masked rank's expert: -1; a repeat of an earlier k sets the same bit); block `reporter` records
/// the bad ones, so that each is reported once.
__device__ inline ExpertBitmaps build_block_bitmaps(const DeviceContext& ctx, const TopkInput& topk,
                                                    bool validate, bool reporter, uint32_t* bits) {
  const int E = ctx.num_experts, L = ctx.local_experts, K = ctx.topk;
  const int64_t T = topk.num_tokens, words = (T + 31) / 32, entries = T * K;
  for (int64_t i = threadIdx.x; i < E * words; i += blockDim.x) bits[i] = 0;
  __syncthreads();
  const uint64_t masked = transport::masked_peers(ctx);
  const int64_t stride = blockDim.x;
  for (int64_t i0 = threadIdx.x; i0 < entries; i0 += stride * kExpertPrefetch) {
    int64_t chosen[kExpertPrefetch];  // this step's loads are all in flight before any is used
#pragma unroll
    for (int j = 0; j < kExpertPrefetch; ++j) {
      const int64_t i = i0 + j * stride;
      chosen[j] = i < entries ? device::load_index(topk.data, topk.is_i64, i) : -1;
    }
#pragma unroll
    for (int j = 0; j < kExpertPrefetch; ++j) {
      const int64_t i = i0 + j * stride, t = i / K;
      const int k = static_cast<int>(i % K);
      const int64_t e = chosen[j];
      if (i >= entries || e == -1) continue;
      if (e < -1 || e >= E) {
        if (reporter)
          transport::record_error(ctx, DeviceErrorKind::kExpertOutOfRange, -1, Phase::kNone, 0, 0,
                                  e, t, k);
        continue;
      }
      if ((masked >> (e / L)) & 1ull) continue;  // a masked rank's expert: not an error
      if (validate && reporter) {
        for (int q = 0; q < k; ++q) {
          if (device::load_index(topk.data, topk.is_i64, t * K + q) == e) {
            transport::record_error(ctx, DeviceErrorKind::kDuplicateExpert, -1, Phase::kNone, 0, 0,
                                    e, t, k);
            break;
          }
        }
      }
      atomicOr(&bits[e * words + (t >> 5)], 1u << (t & 31));
    }
  }
  __syncthreads();
  return {bits, words};
}

/// Exclusive prefix over the popcounts of one bitmap row; returns the row total (all lanes).
/// Each lane loads kScanPrefetch words before the scan, so a row costs one load latency.
__device__ inline int32_t scan_row(const uint32_t* bits, int32_t* prefix, int64_t used_words,
                                   int lane) {
  int32_t running = 0;
  for (int64_t base = 0; base < used_words; base += 32 * kScanPrefetch) {
    uint32_t word[kScanPrefetch];
#pragma unroll
    for (int j = 0; j < kScanPrefetch; ++j) {
      const int64_t w = base + j * 32 + lane;
      word[j] = w < used_words ? bits[w] : 0u;
    }
#pragma unroll
    for (int j = 0; j < kScanPrefetch; ++j) {
      if (base + j * 32 >= used_words) break;  // warp-uniform
      const int64_t w = base + j * 32 + lane;
      const int32_t c = __popc(word[j]);
      int32_t inclusive = c;
      for (int off = 1; off < 32; off <<= 1) {
        const int32_t v = __shfl_up_sync(kFullMask, inclusive, off);
        if (lane >= off) inclusive += v;
      }
      if (w < used_words) prefix[w] = running + inclusive - c;
      running += __shfl_sync(kFullMask, inclusive, 31);
    }
  }
  return running;
}

/// Scans row `row` of the E expert rows followed by the R rank rows (one warp).
__device__ inline void scan_layout_row(const DeviceContext& ctx, int row, int64_t used_words,
                                       int lane) {
  const int E = ctx.num_experts, W = ctx.words;
  const bool expert = row < E;
  const int64_t r = expert ? row : row - E;
  const uint32_t* bits = (expert ? ctx.layout.expert_bitmap : ctx.layout.rank_bitmap) + r * W;
  int32_t* prefix = (expert ? ctx.layout.expert_word_prefix : ctx.layout.rank_word_prefix) + r * W;
  const int32_t total = scan_row(bits, prefix, used_words, lane);
  if (lane == 0)
    (expert ? ctx.layout.num_tokens_per_expert : ctx.layout.num_tokens_per_rank)[r] = total;
}

/// The receive side of a count exchange, from what each rank s sends each rank d (`sent(s, d)`,
/// 0 for a masked s) and to each of this rank's experts (`to_expert(s, le)`): rows received per
/// rank and the send bases (rows that lower ranks send to a receiver come first there), expert
/// counts (padded where asked), the rank prefix and the total. Every rank holds the whole count
/// matrix, so every rank sees any live receiver's overflow and raises it: no rank's call
/// "succeeds" with rows dropped elsewhere; only after a complete exchange (`ok`): a failed one has
/// stale counts. Every thread of the block calls it.
template <typename Sent, typename ToExpert, typename Live>
__device__ inline void derive_receive_counts(const DeviceContext& ctx, const ScanOptions& opt,
                                             uint64_t seq, bool ok, const Sent& sent,
                                             const ToExpert& to_expert, const Live& live) {
  const int R = ctx.num_ranks, L = ctx.local_experts, me = ctx.rank;
  for (int s = threadIdx.x; s < R; s += blockDim.x) {
    ctx.layout.num_recv_per_rank[s] = sent(s, me);
    int32_t base = 0;
    for (int q = 0; q < me; ++q) base += sent(q, s);
    ctx.layout.send_base[s] = base;
  }
  for (int le = threadIdx.x; le < L; le += blockDim.x) {
    int32_t sum = 0;
    for (int s = 0; s < R; ++s) sum += to_expert(s, le);
    ctx.layout.num_recv_per_expert[le] = sum;
    if (opt.recv_per_expert_padded) {
      const int a = opt.expert_alignment;
      opt.recv_per_expert_padded[le] = (sum + a - 1) / a * a;
    }
  }
  if (threadIdx.x != 0) return;
  int64_t total = 0;
  for (int s = 0; s < R; ++s) {
    if (opt.recv_rank_prefix) opt.recv_rank_prefix[s] = static_cast<int32_t>(total);
    total += sent(s, me);
  }
  if (opt.recv_rank_prefix) opt.recv_rank_prefix[R] = static_cast<int32_t>(total);
  if (opt.num_recv) *opt.num_recv = static_cast<int32_t>(total);
  if (!opt.check_capacity || !ok) return;  // get_layout writes no rows and checks nothing
  for (int d = 0; d < R; ++d) {
    if (!live(d)) continue;
    int64_t rows = 0;
    for (int s = 0; s < R; ++s) rows += sent(s, d);
    if (rows > ctx.ht.capacity) {
      transport::record_error(ctx, DeviceErrorKind::kRecvOverflow, d, Phase::kNone, 0, seq, 0, rows,
                              ctx.ht.capacity);
      return;
    }
  }
}

/// Exact sizing: the total and the padded expert counts to the host's mapped buffer, then its
/// flag. Every thread of the block calls it, after derive_receive_counts.
__device__ inline void publish_host_counts(const DeviceContext& ctx, const ScanOptions& opt) {
  if (!opt.host_flag) return;
  __syncthreads();  // the padded counts are written
  if (threadIdx.x != 0) return;
  opt.host_counts[0] = opt.num_recv ? *opt.num_recv : 0;
  for (int le = 0; le < ctx.local_experts; ++le)
    opt.host_counts[1 + le] = opt.recv_per_expert_padded ? opt.recv_per_expert_padded[le] : 0;
  __threadfence_system();
  *opt.host_flag = opt.token;
}

/// One block: sends this rank's counts to every peer, receives theirs, and derives the receive
/// side (rows per source, send bases, per-expert counts, N). Returns false after a failed wait.
__device__ inline bool exchange_counts(const DeviceContext& ctx, uint64_t seq,
                                       const ScanOptions& opt) {
  const int R = ctx.num_ranks, L = ctx.local_experts, me = ctx.rank;
  const int parity = static_cast<int>(seq & 1);
  // Masked ranks take no part: nothing is sent to them, and their rows count as zero (stale
  // otherwise). Every rank with the same mask derives the same bases from the same rows.
  const uint64_t masked = transport::masked_peers(ctx);
  auto live = [masked](int r) { return !((masked >> r) & 1ull); };
  // Put this rank's row of the count matrix, and its counts for each peer's experts, into every
  // peer; then signal.
  for (int i = threadIdx.x; i < R * R; i += blockDim.x) {
    const int d = i / R, j = i % R;
    if (live(d))
      transport::peer_region<int32_t>(ctx, d, ctx.layout.count_matrix)[(parity * R + me) * R + j] =
          ctx.layout.num_tokens_per_rank[j];
  }
  for (int i = threadIdx.x; i < R * L; i += blockDim.x) {
    const int d = i / L, le = i % L;
    if (live(d))
      transport::peer_region<int32_t>(ctx, d,
                                      ctx.layout.expert_counts)[(parity * R + me) * L + le] =
          ctx.layout.num_tokens_per_expert[d * L + le];
  }
  __syncthreads();
  const bool ok =
      transport::signal_and_wait_all(ctx, FlagKind::kLayoutCounts, seq, Phase::kLayoutCounts, 0);
  const int32_t* matrix =
      transport::peer_region<int32_t>(ctx, me, ctx.layout.count_matrix) + parity * R * R;
  const int32_t* per_expert =
      transport::peer_region<int32_t>(ctx, me, ctx.layout.expert_counts) + parity * R * L;
  // A row of the matrix as received: zero for a masked source.
  auto sent = [&](int s, int d) { return live(s) ? matrix[s * R + d] : 0; };
  auto to_expert = [&](int s, int le) { return live(s) ? per_expert[s * L + le] : 0; };
  derive_receive_counts(ctx, opt, seq, ok, sent, to_expert, live);
  publish_host_counts(ctx, opt);
  return ok;
}

}  // namespace steps

/// Every thread of every block of the calling kernel: computes the layout of `p.topk` for call
/// `seq`. `columns` is the block's dynamic shared memory (column_warps(E, warps) columns of E
/// words). Returns false in every thread after a failed wait (the caller still finishes its
/// barriers and the call; the host raises).
__device__ inline bool compute_layout(const detail::DeviceContext& ctx, const LayoutParams& p,
                                      uint64_t seq, uint32_t* columns, device::RankBlocks blocks) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t used_words = (p.topk.num_tokens + 31) / 32;
  const int builders = column_warps(ctx.num_experts, warps);
  if (warp < builders) {
    uint32_t* column = columns + static_cast<size_t>(warp) * ctx.num_experts;
    for (int64_t w = static_cast<int64_t>(blocks.index) * builders + warp; w < used_words;
         w += static_cast<int64_t>(blocks.count) * builders)
      steps::build_word(ctx, p.topk, p.validate, w, column, lane);
  }
  bool ok = transport::grid_barrier(ctx, true, blocks);
  if (!p.prefix) return ok && !transport::aborted(ctx);

  const int rows = ctx.num_experts + ctx.num_ranks;
  for (int row = blocks.index * warps + warp; row < rows; row += blocks.count * warps)
    steps::scan_layout_row(ctx, row, used_words, lane);
  ok = transport::grid_barrier(ctx, ok, blocks);

  if (p.scan.exchange_counts) {
    if (blocks.index == 0) ok = steps::exchange_counts(ctx, seq, p.scan) && ok;
    ok = transport::grid_barrier(ctx, ok, blocks);
  }
  // A failed exchange in block 0 aborts the rank: every block sees it after the barrier.
  return ok && !transport::aborted(ctx);
}

/// Every thread of every block of the calling kernel: the expert bitmaps alone (LayoutParams
/// without prefix), in each block's `smem` where p.block_bitmaps (no block waits for another),
/// else in global memory by all blocks behind a grid barrier. `bitmaps` says where they are.
/// Returns false in every thread after a failed wait.
__device__ inline bool compute_expert_bitmaps(const detail::DeviceContext& ctx,
                                              const LayoutParams& p, uint64_t seq, uint32_t* smem,
                                              device::RankBlocks blocks, ExpertBitmaps& bitmaps) {
  if (p.block_bitmaps) {
    bitmaps = steps::build_block_bitmaps(ctx, p.topk, p.validate, blocks.index == 0, smem);
    return !transport::aborted(ctx);
  }
  bitmaps = {ctx.layout.expert_bitmap, ctx.words};
  return compute_layout(ctx, p, seq, smem, blocks);
}

}  // namespace moecomm::layout
