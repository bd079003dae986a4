// What the low-latency dispatch and combine kernels (ll/dispatch.cu, ll/combine.cu) share: the
// block shapes, where a count word or an RDMA signal lies, how a token's row is cut into pieces,
// a token's destinations, and the one-launch group's block split.
#pragma once

#include <string>

#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "layout/layout.hpp"
#include "layout/layout_steps.cuh"
#include "ll/group_params.hpp"
#include "ll/ll.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/kernel_preload.hpp"
#include "runtime/register_budget.hpp"
#include "transport/barrier.cuh"
#include "transport/rdma.cuh"
#include "transport/signal.cuh"

namespace moecomm::ll {

using detail::DeviceContext;
using detail::FlagKind;
using detail::kFp8Group;
using detail::kMaxBlockThreads;
using detail::Phase;
using detail::TraceMark;
using device::kFullMask;
using device::kWarpLanes;
inline constexpr int kMaxWarps = kMaxBlockThreads / kWarpLanes;
using device::kBf16PerVec;
inline constexpr int kCombineBatch = 8;  // slot rows loaded before they are accumulated
inline constexpr int kCountShift = 32;   // ll_count_sig word: (seq << 32) | count
inline constexpr uint64_t kCountMask = (1ull << kCountShift) - 1;
inline constexpr int kRecvThreads = 256;  // dispatch receive: one block
// combine send: one block, one thread per peer
inline constexpr int kCombineSendThreads = detail::kMaxRanks;

namespace rdma = transport::rdma;

// A group that spans nodes (ctx.num_nodes > 1) runs the kInternode instances of the kernels: ranks
// of this node keep loads and stores; ranks of other nodes are reached only through the RDMA
// engine (window offsets, counter signals). With one node the kernels are the plain instances,
// unchanged.

/// True when rank r is on this rank's node.
__device__ __forceinline__ bool same_node(const DeviceContext& ctx, int r) {
  return r / ctx.node_size == ctx.node;
}

/// Index of rank r (not on node n) among the ranks that are not on node n.
__device__ __forceinline__ int remote_index(int r, int n, int node_size) {
  return r < n * node_size ? r : r - node_size;
}

/// Window offset of signal counter `src` of the per-buffer array at `base` ([2][R] u64).
__device__ __forceinline__ uint64_t signal_at(const DeviceContext& ctx, size_t base, int b,
                                              int src) {
  return base + (static_cast<uint64_t>(b) * ctx.num_ranks + src) * sizeof(uint64_t);
}

/// Word (b, le, src) of ll_count_sig in `owner`'s buffer.
__device__ __forceinline__ uint64_t* count_word(const DeviceContext& ctx, int owner, int b, int le,
                                                int src) {
  return transport::peer_region<uint64_t>(ctx, owner, ctx.ll.count_sig) +
         (static_cast<int64_t>(b) * ctx.local_experts + le) * ctx.num_ranks + src;
}

/// A token's row is cut into pieces of whole 128-channel units so that every warp of the grid
/// has work even when T is small (a warp per row would leave most warps idle at T = 128): as many
/// pieces as warps per token, but none smaller than `min_units` (what one warp step handles).
struct RowPieces {
  int count = 1;      // pieces per row
  int units = 1;      // units per piece (the last may be shorter)
  int64_t items = 0;  // T * count work items

  __device__ RowPieces(int64_t tokens, int64_t warps, int row_units, int min_units) {
    const int64_t wanted = tokens > 0 ? (warps + tokens - 1) / tokens : 1;
    const int most = (row_units + min_units - 1) / min_units;
    count = static_cast<int>(wanted < most ? wanted : most);
    if (count < 1) count = 1;
    units = (row_units + count - 1) / count;
    count = (row_units + units - 1) / units;
    items = tokens * count;
  }
};

/// Where one message of a token goes.
struct Destination {
  uint8_t* x;     // the slot's row in the receiver's ll_x (same node)
  float* scales;  // the slot's scales (fp8, same node)
  int32_t peer;   // internode: the receiver on another node (its slot is put), else -1
  int64_t slot;   // internode: the slot at the receiver
};

/// The valid destinations of token t, compacted in k order into `dst` (one entry per lane
/// k < K whose expert the layout counted: not -1, in range, not a repeat of an earlier k); its
/// slot among an expert's slots is its position in that expert's bitmap.
/// Returns how many. With `record` (the token's first piece), lane k also writes the handle's
/// slot_of and the source token of the slot at its destination. Whole warp. kInternode: a
/// destination on another node gets peer >= 0 (`remote` counts them) and its source token is
/// put into the receiver's meta words.
template <bool kInternode>
__device__ int token_destinations(const DeviceContext& ctx, const DispatchSendParams& p,
                                  const layout::ExpertBitmaps& bitmaps, int64_t t, bool record,
                                  int lane, uint64_t masked, Destination* dst, rdma::WarpPort& port,
                                  int& remote) {
  const int R = ctx.num_ranks, L = ctx.local_experts, K = ctx.topk;
  const int M = ctx.ll.capacity, H = ctx.hidden, b = p.buffer;
  const int64_t e = lane < K ? device::load_index(p.topk_idx, p.idx_i64, t * K + lane) : -1;
  bool valid = e >= 0 && e < ctx.num_experts && !((masked >> (e / L)) & 1ull);
  for (int j = 0; j < K; ++j) {
    const int64_t ej = __shfl_sync(kFullMask, e, j);
    if (j < lane && ej == e) valid = false;
  }
  const unsigned mask = __ballot_sync(kFullMask, valid);
  if (valid) {
    const int d = static_cast<int>(e / L), le = static_cast<int>(e % L);
    const int32_t pos = layout::bitmap_rank(bitmaps.row(e), t);
    const int64_t slot =
        static_cast<int64_t>(le) * R * M + static_cast<int64_t>(ctx.rank) * M + pos;
    const int at = __popc(mask & device::lanemask_lt());
    const int width = p.fp8 ? H : H * 2;
    const bool far = kInternode && !same_node(ctx, d);
    if (far) {
      dst[at].x = nullptr;
      dst[at].scales = nullptr;
      dst[at].peer = d;
      dst[at].slot = slot;
    } else {
      dst[at].x = transport::peer_region<uint8_t>(ctx, d, ctx.ll.x[b]) + slot * width;
      dst[at].scales =
          transport::peer_region<float>(ctx, d, ctx.ll.scales[b]) + slot * (H / kFp8Group);
      dst[at].peer = -1;
    }
    if (record) {
      p.slot_of[t * K + lane] = static_cast<int32_t>(d * static_cast<int64_t>(L) * R * M + slot);
      if (!far)
        transport::peer_region<int32_t>(ctx, d, ctx.ll.src_token[b])[slot] =
            static_cast<int32_t>(t);
    }
  } else if (record && lane < K) {
    p.slot_of[t * K + lane] = -1;
  }
  __syncwarp();
  const int n = __popc(mask);
  if constexpr (kInternode) {
    remote = 0;
    for (int k = 0; k < n; ++k) {
      const Destination& to = dst[k];
      if (to.peer < 0) continue;
      ++remote;
      if (record)
        port.put_value(to.peer,
                       ctx.ll.meta[b] + static_cast<uint64_t>(to.slot) * ctx.ll.meta_words * 8,
                       static_cast<uint32_t>(t));
    }
  }
  return n;
}

inline constexpr int kUnitChannels = 128;  // a row piece is whole units of 128 channels
inline constexpr int kVectorsPerUnit = kUnitChannels / kBf16PerVec;
// A quantised piece has at least the units of two steps of quantize_groups (fewer, larger pieces
// would leave warps idle at a few tokens). A copy step: kWarpLanes * kRowCopyUnroll vectors.
inline constexpr int kQuantizeStepUnits = device::kFp8GroupsPerWarp * device::kQuantizeUnroll;
inline constexpr int kCopyStepUnits = kWarpLanes * device::kRowCopyUnroll / kVectorsPerUnit;
inline constexpr int kCombineStepUnits = kWarpLanes / kVectorsPerUnit;  // one vector per lane

/// Block b serves rank b / blocks_per_rank of a one-GPU group as its block b % blocks_per_rank.
__device__ __forceinline__ int group_rank(const GroupLaunch& g) {
  return static_cast<int>(blockIdx.x) / g.blocks_per_rank;
}
__device__ __forceinline__ device::RankBlocks group_blocks(const GroupLaunch& g) {
  return {static_cast<int>(blockIdx.x) % g.blocks_per_rank, g.blocks_per_rank};
}

/// Raises InvalidArgument unless the grid is one the kernels can run.
inline void check_grid(int blocks, int threads, const char* kernel) {
  if (blocks < 1 || threads < kWarpLanes || threads > kMaxBlockThreads || threads % kWarpLanes != 0)
    throw InvalidArgument(std::string(kernel) +
                          ": expected blocks >= 1 and threads a multiple of " +
                          std::to_string(kWarpLanes) + " in " + std::to_string(kWarpLanes) + ".." +
                          std::to_string(kMaxBlockThreads) + ", got " + std::to_string(blocks) +
                          " x " + std::to_string(threads));
}

}  // namespace moecomm::ll
