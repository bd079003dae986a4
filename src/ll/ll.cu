#include "ll/ll.hpp"

#include <string>

#include "device/memory_model.cuh"
#include "device/numerics.cuh"
#include "device/row_ops.cuh"
#include "layout/layout.hpp"
#include "layout/layout_steps.cuh"
#include "ll/group_params.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "transport/barrier.cuh"
#include "transport/rdma.cuh"
#include "transport/signal.cuh"

namespace moecomm::ll {

using detail::DeviceContext;
using detail::FlagKind;
using detail::kFp8Group;
using detail::Phase;

namespace {

using detail::kMaxBlockThreads;
using device::kFullMask;
using device::kWarpLanes;
constexpr int kMaxWarps = kMaxBlockThreads / kWarpLanes;
using device::kBf16PerVec;
constexpr int kCombineBatch = 8;  // slot rows loaded before they are accumulated
constexpr int kCountShift = 32;   // ll_count_sig word: (seq << 32) | count
constexpr uint64_t kCountMask = (1ull << kCountShift) - 1;
constexpr int kRecvThreads = 256;                       // dispatch receive: one block
constexpr int kCombineSendThreads = detail::kMaxRanks;  // combine send: one block, one per peer

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
/// k < K whose expert the layout counted: not -1, in range, not a repeat of an earlier k).
/// Returns how many. With `record` (the token's first piece), lane k also writes the handle's
/// slot_of and the source token of the slot at its destination. Whole warp. kInternode: a
/// destination on another node gets peer >= 0 (`remote` counts them) and its source token is
/// put into the receiver's meta words.
template <bool kInternode>
__device__ int token_destinations(const DeviceContext& ctx, const DispatchSendParams& p, int64_t t,
                                  bool record, int lane, uint64_t masked, Destination* dst,
                                  rdma::WarpPort& port, int& remote) {
  const int R = ctx.num_ranks, L = ctx.local_experts, K = ctx.topk, W = ctx.words;
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
    const int32_t pos = layout::bitmap_rank(ctx.layout.expert_bitmap + e * W, t);
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

constexpr int kUnitChannels = 128;  // a row piece is whole units of 128 channels
constexpr int kVectorsPerUnit = kUnitChannels / kBf16PerVec;
// One warp step: quantisation handles kFp8GroupsPerWarp * kQuantizeUnroll groups, a copy
// kWarpLanes * kRowCopyUnroll vectors.
constexpr int kQuantizeStepUnits = device::kFp8GroupsPerWarp * device::kQuantizeUnroll;
constexpr int kCopyStepUnits = kWarpLanes * device::kRowCopyUnroll / kVectorsPerUnit;
constexpr int kCombineStepUnits = kWarpLanes / kVectorsPerUnit;  // one vector per lane

template <bool kInternode>
__device__ void receive_counts(const DeviceContext& ctx, const DispatchRecvParams& p, uint64_t seq);

/// Block 0: tells every peer that this rank entered call seq (transport::announce_arrival; with
/// kInternode, a counter signal through the engine to the ranks of other nodes).
template <bool kInternode>
__device__ void announce(const DeviceContext& ctx, uint64_t seq, device::RankBlocks blocks,
                         rdma::WarpPort& port) {
  if constexpr (!kInternode) {
    transport::announce_arrival(ctx, seq, blocks);
  } else if (blocks.index == 0) {
    const int R = ctx.num_ranks;
    const uint64_t masked = transport::masked_peers(ctx);
    for (int d = threadIdx.x; d < R; d += blockDim.x)
      if (same_node(ctx, d) && !((masked >> d) & 1ull))
        transport::signal(ctx, d, FlagKind::kArrive, seq);
    const int warp = threadIdx.x / kWarpLanes, warps = blockDim.x / kWarpLanes;
    for (int d = warp; d < R; d += warps)
      if (!same_node(ctx, d))
        port.signal(d, ctx.ll.sig_arrive + static_cast<uint64_t>(ctx.rank) * sizeof(uint64_t), 1);
  }
}

/// Every block: waits until every peer entered call seq. kInternode: a remote peer's arrival
/// counter is waited for by every block and consumed once, by the rank's last block
/// (after its count signals): a peer runs at most one dispatch ahead, which leaves its count at 2.
template <bool kInternode>
__device__ bool await_peers(const DeviceContext& ctx, uint64_t seq, device::RankBlocks blocks) {
  if constexpr (!kInternode) {
    return transport::await_arrivals(ctx, seq, blocks);
  } else {
    bool ok = true;
    for (int d = threadIdx.x; d < ctx.num_ranks; d += blockDim.x) {
      ok = (same_node(ctx, d) ? transport::wait_signal(ctx, FlagKind::kArrive, d, seq,
                                                       Phase::kArrive, blocks.index)
                              : rdma::wait_signal(ctx, ctx.ll.sig_arrive + d * sizeof(uint64_t), 1,
                                                  d, Phase::kRdmaArrive, blocks.index)) &&
           ok;
    }
    return __syncthreads_and(ok) != 0;
  }
}

/// The send phase of one rank, run by `blocks` (with `receive`, the receive phase too).
template <bool kInternode>
__device__ void dispatch_send(const DeviceContext& ctx, const DispatchSendParams& p,
                              device::RankBlocks blocks, uint32_t* columns) {
  const uint64_t seq = device::read_call_seq(ctx);
  const int L = ctx.local_experts, E = ctx.num_experts, H = ctx.hidden, me = ctx.rank;
  const int b = p.buffer;
  const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
  __shared__ Destination dst[kMaxWarps][detail::kMaxTopk];
  if (blocks.index == 0 && threadIdx.x == 0) ctx.ll.dispatch_seq[b] = seq;
  rdma::WarpPort port(ctx);  // kInternode only
  // kInternode: this rank's rows bound for other nodes are staged here (row t at t * 2H bytes;
  // fp8: H bytes of e4m3, then the f32 scales), then put from here.
  const uint64_t stage_row = static_cast<uint64_t>(H) * 2;

  // Arrive first, wait after the layout: the peers' arrival overlaps this rank's layout steps.
  announce<kInternode>(ctx, seq, blocks, port);
  const bool laid_out = layout::compute_layout(ctx, p.layout, seq, columns, blocks);
  const bool ok = await_peers<kInternode>(ctx, seq, blocks) && laid_out;

  const int warps = blockDim.x / kWarpLanes;
  const int64_t stride = static_cast<int64_t>(blocks.count) * warps;
  // Units of 128 channels, the last one partial when H is not a multiple of 128 (bf16 only: fp8
  // needs whole scale groups, which the config enforces).
  const int row_units = (H + kUnitChannels - 1) / kUnitChannels;
  const int row_vectors = H / kBf16PerVec;
  const RowPieces pieces(p.num_tokens, stride, row_units,
                         p.fp8 ? kQuantizeStepUnits : kCopyStepUnits);
  // Tokens bound for masked ranks are dropped (their slot_of is -1: combine adds nothing).
  const uint64_t masked = transport::masked_peers(ctx);
  // One warp per piece of a token's row: the piece is read (and quantised) once and written to
  // every destination of the token. T <= M (checked by the host), so every slot exists.
  for (int64_t i = static_cast<int64_t>(blocks.index) * warps + warp; ok && i < pieces.items;
       i += stride) {
    const int64_t t = i / pieces.count;
    const int piece = static_cast<int>(i % pieces.count);
    int remote = 0;
    const int n = token_destinations<kInternode>(ctx, p, t, piece == 0, lane, masked, dst[warp],
                                                 port, remote);
    const int u0 = piece * pieces.units;
    const int units = min(pieces.units, row_units - u0);
    const int4* src = reinterpret_cast<const int4*>(p.x + t * H) + u0 * kVectorsPerUnit;
    uint8_t* staged = nullptr;  // kInternode with a destination on another node: the staged row
    if constexpr (kInternode)
      if (remote > 0)
        staged = transport::peer_region<uint8_t>(ctx, me, ctx.ll.stage) + t * stage_row;
    if (p.fp8) {
      device::quantize_groups(
          src, units, p.pow2_scales, lane, [&](int g, int sub, uint4 q, float scale, bool valid) {
            if (!valid) return;
            const int unit = u0 + g;
            for (int k = 0; k < n; ++k) {
              const Destination& to = dst[warp][k];
              if constexpr (kInternode)
                if (to.peer >= 0) continue;
              *reinterpret_cast<uint4*>(to.x + unit * kFp8Group + sub * device::kChannelsPerLane) =
                  q;
              if (sub == 0) to.scales[unit] = scale;
            }
            if constexpr (kInternode) {
              if (staged) {
                *reinterpret_cast<uint4*>(staged + unit * kFp8Group +
                                          sub * device::kChannelsPerLane) = q;
                if (sub == 0) reinterpret_cast<float*>(staged + H)[unit] = scale;
              }
            }
          });
    } else {
      const int vectors = min(units * kVectorsPerUnit, row_vectors - u0 * kVectorsPerUnit);
      device::copy_vectors(
          src, vectors, lane, [&](int base, const int4(&v)[device::kRowCopyUnroll]) {
            for (int k = 0; k < n; ++k) {
              if constexpr (kInternode)
                if (dst[warp][k].peer >= 0) continue;
              int4* to = reinterpret_cast<int4*>(dst[warp][k].x) + u0 * kVectorsPerUnit;
#pragma unroll
              for (int u = 0; u < device::kRowCopyUnroll; ++u) {
                const int v16 = base + u * kWarpLanes + lane;
                if (v16 < vectors) to[v16] = v[u];
              }
            }
            if constexpr (kInternode) {
              if (staged) {
                int4* to = reinterpret_cast<int4*>(staged) + u0 * kVectorsPerUnit;
#pragma unroll
                for (int u = 0; u < device::kRowCopyUnroll; ++u) {
                  const int v16 = base + u * kWarpLanes + lane;
                  if (v16 < vectors) to[v16] = v[u];
                }
              }
            }
          });
      if constexpr (kInternode) {
        if (staged) {  // the piece, from the staged row to each remote slot
          const uint64_t from = ctx.ll.stage + t * stage_row + u0 * kUnitChannels * 2;
          for (int k = 0; k < n; ++k) {
            const Destination& to = dst[warp][k];
            if (to.peer < 0) continue;
            port.put(to.peer, ctx.ll.x[b] + to.slot * stage_row + u0 * kUnitChannels * 2, from,
                     static_cast<uint64_t>(vectors) * 16);
          }
        }
      }
    }
    if constexpr (kInternode) {
      if (staged && p.fp8) {  // the piece's e4m3 bytes, then its scales through the meta words
        __syncwarp();         // every lane's staged bytes and scales
        const uint64_t from = ctx.ll.stage + t * stage_row + u0 * kFp8Group;
        const uint32_t* scales = reinterpret_cast<const uint32_t*>(staged + H);
        for (int k = 0; k < n; ++k) {
          const Destination& to = dst[warp][k];
          if (to.peer < 0) continue;
          port.put(to.peer, ctx.ll.x[b] + to.slot * H + u0 * kFp8Group, from,
                   static_cast<uint64_t>(units) * kFp8Group);
          const uint64_t meta = ctx.ll.meta[b] + static_cast<uint64_t>(to.slot) *
                                                     ctx.ll.meta_words * sizeof(uint64_t);
          for (int u = u0; u < u0 + units; ++u)
            port.put_value(to.peer, meta + (1 + u) * sizeof(uint64_t),
                           *reinterpret_cast<const volatile uint32_t*>(scales + u));
        }
      }
    }
    __syncwarp();  // dst[warp] is rewritten for the next piece
  }
  // kInternode: every put of this warp has landed before the block takes its ticket, so the
  // counts the last block signals cover every block's rows.
  if constexpr (kInternode) port.flush();

  // The last block to finish publishes every (expert, this rank) count: by then every block's
  // rows are written (is_last_block fences before its ticket), so one release per word covers
  // them. Experts this rank sends nothing to get count 0.
  if (transport::is_last_block(ctx, blocks)) {
    if (ok && !transport::aborted(ctx)) {
      const device::Scope sc = transport::scope(ctx);
      const int64_t used_words = (p.num_tokens + 31) / 32;
      for (int e = threadIdx.x; e < E; e += blockDim.x) {
        if ((masked >> (e / L)) & 1ull) continue;
        if constexpr (kInternode)
          if (!same_node(ctx, e / L)) continue;
        const uint32_t count = static_cast<uint32_t>(layout::bitmap_count(
            ctx.layout.expert_bitmap + static_cast<int64_t>(e) * ctx.words, used_words));
        sc.store_release(count_word(ctx, e / L, b, e % L, me), (seq << kCountShift) | count);
      }
      if constexpr (kInternode) {
        // A rank of another node gets its count words put, then one signal per (buffer,
        // source) that its receive phase waits for (the rows of every block landed before).
        const int R = ctx.num_ranks, warps = blockDim.x / kWarpLanes;
        for (int d = warp; d < R; d += warps) {
          if (same_node(ctx, d)) continue;
          for (int le = 0; le < L; ++le) {
            const int64_t e = static_cast<int64_t>(d) * L + le;
            const uint32_t count = static_cast<uint32_t>(
                layout::bitmap_count(ctx.layout.expert_bitmap + e * ctx.words, used_words));
            port.put_value(d,
                           ctx.ll.count_sig +
                               ((static_cast<uint64_t>(b) * L + le) * R + me) * sizeof(uint64_t),
                           (seq << kCountShift) | count);
          }
          port.signal(d, signal_at(ctx, ctx.ll.sig_counts, b, me), 1);
        }
        // Every block has seen every remote arrival of this call: take them back.
        for (int d = threadIdx.x; d < R; d += blockDim.x)
          if (!same_node(ctx, d))
            rdma::consume_signal(ctx, ctx.ll.sig_arrive + d * sizeof(uint64_t), 1);
      }
    }
    if (p.receive) receive_counts<kInternode>(ctx, p.recv, seq);  // no hook: the receive phase
    __syncthreads();
    if (threadIdx.x == 0) device::close_call(ctx);
  }
}

template <bool kInternode>
__global__ void __launch_bounds__(kMaxBlockThreads)
    dispatch_send_kernel(DeviceContext ctx, DispatchSendParams p) {
  extern __shared__ uint32_t columns[];  // the layout's bitmap columns
  dispatch_send<kInternode>(ctx, p, device::whole_grid(), columns);
}

/// One block: waits for every (local expert, source) count of call `seq` and writes the receive
/// layout and per-expert counts. kInternode: a source on another node is waited for through its
/// counter signal (then its count words, put before it, are read), and the source tokens and
/// scales of its slots are moved from the meta words to their places.
template <bool kInternode>
__device__ void receive_counts(const DeviceContext& ctx, const DispatchRecvParams& p,
                               uint64_t seq) {
  const int R = ctx.num_ranks, L = ctx.local_experts, M = ctx.ll.capacity, b = p.buffer;
  const uint64_t* words = count_word(ctx, ctx.rank, b, 0, 0);
  bool ok = true;
  if constexpr (kInternode) {
    for (int s = threadIdx.x; s < R; s += blockDim.x) {
      if (same_node(ctx, s)) continue;
      const uint64_t sig = signal_at(ctx, ctx.ll.sig_counts, b, s);
      if (!rdma::wait_signal(ctx, sig, 1, s, Phase::kRdmaCounts, b)) {
        ok = false;
        continue;
      }
      rdma::consume_signal(ctx, sig, 1);
    }
    if (!__syncthreads_and(ok)) return;
  }
  for (int i = threadIdx.x; i < L * R; i += blockDim.x) {
    const int le = i / R, s = i % R;
    if constexpr (kInternode) {
      if (!same_node(ctx, s)) {  // signalled above
        p.recv_layout[2 * i] = s * M;
        p.recv_layout[2 * i + 1] =
            static_cast<int32_t>(transport::scope(ctx).load_acquire(words + i) & kCountMask);
        continue;
      }
    }
    if (!transport::wait_geq(ctx, words + i, seq << kCountShift, s, Phase::kLlCounts, le)) {
      ok = false;
      break;
    }
    p.recv_layout[2 * i] = s * M;
    p.recv_layout[2 * i + 1] =  // a masked source (or one masked while waited for) sent nothing
        transport::is_masked(ctx, s)
            ? 0
            : static_cast<int32_t>(transport::scope(ctx).load_acquire(words + i) & kCountMask);
  }
  if (!__syncthreads_and(ok)) return;
  for (int le = threadIdx.x; le < L; le += blockDim.x) {
    int32_t sum = 0;
    for (int s = 0; s < R; ++s) sum += p.recv_layout[2 * (le * R + s) + 1];
    p.recv_count[le] = sum;
  }
  if constexpr (kInternode) {
    const int H = ctx.hidden, groups = p.fp8 ? H / kFp8Group : 0, words_per = 1 + groups;
    const int64_t meta_words = ctx.ll.meta_words;
    const volatile uint64_t* meta = transport::peer_region<uint64_t>(ctx, ctx.rank, ctx.ll.meta[b]);
    int32_t* src = transport::peer_region<int32_t>(ctx, ctx.rank, ctx.ll.src_token[b]);
    float* scales = transport::peer_region<float>(ctx, ctx.rank, ctx.ll.scales[b]);
    // One warp per (expert, remote source), kMetaUnroll words per lane in flight: the block's
    // warps and lanes all copy at once (a loop of dependent loads would cost a latency each).
    constexpr int kMetaUnroll = 4;
    const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
    for (int i = warp; i < L * R; i += blockDim.x / kWarpLanes) {
      const int s = i % R;
      if (same_node(ctx, s)) continue;
      const int64_t first = static_cast<int64_t>(i / R) * R * M + static_cast<int64_t>(s) * M;
      const int n = p.recv_layout[2 * i + 1] * words_per;
      for (int j0 = lane; j0 < n; j0 += kWarpLanes * kMetaUnroll) {
        uint64_t v[kMetaUnroll];
#pragma unroll
        for (int u = 0; u < kMetaUnroll; ++u) {
          const int j = j0 + u * kWarpLanes;
          if (j < n) v[u] = meta[(first + j / words_per) * meta_words + j % words_per];
        }
#pragma unroll
        for (int u = 0; u < kMetaUnroll; ++u) {
          const int j = j0 + u * kWarpLanes;
          if (j >= n) break;
          const int64_t slot = first + j / words_per;
          const int w = j % words_per;
          if (w == 0)
            src[slot] = static_cast<int32_t>(static_cast<uint32_t>(v[u]));
          else
            scales[slot * (H / kFp8Group) + w - 1] = __uint_as_float(static_cast<uint32_t>(v[u]));
        }
      }
    }
  }
}

template <bool kInternode>
__global__ void __launch_bounds__(kRecvThreads)
    dispatch_recv_kernel(DeviceContext ctx, DispatchRecvParams p) {
  receive_counts<kInternode>(ctx, p, ctx.ll.dispatch_seq[p.buffer]);
}

/// One block: tells every peer where this rank's expert outputs y are, for call `seq`
/// (kInternode: the peers of this node; the others get their rows pushed, push_rows).
template <bool kInternode>
__device__ void publish_outputs(const DeviceContext& ctx, int buffer, uint64_t y, uint64_t seq) {
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t masked = transport::masked_peers(ctx);
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if ((masked >> d) & 1ull) continue;
    if constexpr (kInternode)
      if (!same_node(ctx, d)) continue;
    uint64_t* slot = transport::peer_region<uint64_t>(ctx, d, ctx.ll.peer_ptrs) +
                     (buffer * R + me) * detail::kPeerPtrs;
    slot[0] = y;
    transport::scope(ctx).fence();  // y (written by earlier kernels) and its address
    transport::signal(ctx, d, FlagKind::kCombineReady, seq);
  }
}

/// Internode combine send, every block of the rank: puts each row of y that a source on another
/// node will read into that source's combine_recv[b] ([rank among those off its node][le]
/// [position]). A put starts in this rank's window: y is used in place when it lies there (the
/// zero-copy combine_buffer), else each row is first copied to its slot of combine[b] (only the
/// rows bound for other nodes). The slots' counts are those of the dispatch's receive phase.
/// Flushes the warp's port.
__device__ void push_rows(const DeviceContext& ctx, int b, uint64_t y, device::RankBlocks blocks,
                          rdma::WarpPort& port) {
  const int R = ctx.num_ranks, L = ctx.local_experts, M = ctx.ll.capacity, G = ctx.node_size;
  const uint64_t row = static_cast<uint64_t>(ctx.hidden) * 2;
  const int64_t items = static_cast<int64_t>(L) * R * M;  // y's slots: le, source, position
  const uint64_t y_off = y & ~detail::kSymmetricOffsetTag;
  const bool in_window = (y & detail::kSymmetricOffsetTag) && y_off % 16 == 0 &&
                         y_off + static_cast<uint64_t>(items) * row <= ctx.rdma.window_bytes;
  const uint8_t* y_local = static_cast<const uint8_t*>(transport::resolve_address(ctx, ctx.rank, y));
  const int32_t* layout = ctx.ll.recv_layout + static_cast<size_t>(b) * L * R * 2;
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  const int lane = threadIdx.x % kWarpLanes;
  for (int64_t i = static_cast<int64_t>(blocks.index) * warps + warp; i < items;
       i += static_cast<int64_t>(blocks.count) * warps) {
    const int le = static_cast<int>(i / (static_cast<int64_t>(R) * M));
    const int s = static_cast<int>(i / M % R), pos = static_cast<int>(i % M);
    if (same_node(ctx, s) || pos >= layout[2 * (le * R + s) + 1]) continue;
    uint64_t from_off = y_off + static_cast<uint64_t>(i) * row;
    if (!in_window) {
      from_off = ctx.ll.combine[b] + static_cast<uint64_t>(i) * row;
      const uint8_t* src = y_local + static_cast<uint64_t>(i) * row;
      int4* dst = transport::peer_region<int4>(ctx, ctx.rank, from_off);
      for (uint64_t v = lane; v < row / 16; v += kWarpLanes)
        dst[v] = device::ld_peer_16_any(src + v * 16);
    }
    const int from = remote_index(ctx.rank, s / G, G);
    port.put(s, ctx.ll.combine_recv[b] + ((static_cast<uint64_t>(from) * L + le) * M + pos) * row,
             from_off, row);
  }
  port.flush();
}

/// One block (after every block's push_rows): one signal per (buffer, this rank) to every rank
/// of another node.
__device__ void signal_rows_pushed(const DeviceContext& ctx, int b, rdma::WarpPort& port) {
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  for (int d = warp; d < ctx.num_ranks; d += warps)
    if (!same_node(ctx, d)) port.signal(d, signal_at(ctx, ctx.ll.sig_combine, b, ctx.rank), 1);
}

template <bool kInternode>
__global__ void __launch_bounds__(kInternode ? kMaxBlockThreads : kCombineSendThreads)
    combine_send_kernel(DeviceContext ctx, CombineSendParams p) {
  const uint64_t seq = device::read_call_seq(ctx);
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) ctx.ll.combine_seq[p.buffer] = seq;
    publish_outputs<kInternode>(ctx, p.buffer, p.y, seq);
  }
  if constexpr (kInternode) {
    rdma::WarpPort port(ctx);
    push_rows(ctx, p.buffer, p.y, device::whole_grid(), port);
    if (transport::is_last_block(ctx)) {
      if (!transport::aborted(ctx)) signal_rows_pushed(ctx, p.buffer, port);
      __syncthreads();
      if (threadIdx.x == 0) device::close_call(ctx);
    }
  } else {
    if (threadIdx.x == 0) device::close_call(ctx);  // every thread read seq in read_call_seq
  }
}

/// kInternode end of a combine (the rank's last block): takes back the remote rows' signals,
/// tells every peer this rank has read what it needed (same node: the kCombineDone flag; other
/// nodes: a counter signal) and waits for every peer to say the same.
__device__ bool finish_combine_internode(const DeviceContext& ctx, int b, uint64_t seq, int channel,
                                         rdma::WarpPort& port) {
  const int R = ctx.num_ranks, me = ctx.rank;
  const uint64_t masked = transport::masked_peers(ctx);
  const bool fine = !transport::aborted(ctx);
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (fine && !same_node(ctx, d))
      rdma::consume_signal(ctx, signal_at(ctx, ctx.ll.sig_combine, b, d), 1);
  if (threadIdx.x < R) transport::scope(ctx).fence();
  for (int d = threadIdx.x; d < R; d += blockDim.x)
    if (same_node(ctx, d) && !((masked >> d) & 1ull))
      transport::signal(ctx, d, FlagKind::kCombineDone, seq);
  const int warps = blockDim.x / kWarpLanes, warp = threadIdx.x / kWarpLanes;
  for (int d = warp; d < R; d += warps)
    if (!same_node(ctx, d)) port.signal(d, signal_at(ctx, ctx.ll.sig_done, b, me), 1);
  bool ok = true;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if (same_node(ctx, d)) {
      ok = transport::wait_signal(ctx, FlagKind::kCombineDone, d, seq, Phase::kCombineDone,
                                  channel) &&
           ok;
    } else {
      const uint64_t sig = signal_at(ctx, ctx.ll.sig_done, b, d);
      if (rdma::wait_signal(ctx, sig, 1, d, Phase::kCombineDone, channel))
        rdma::consume_signal(ctx, sig, 1);
      else
        ok = false;
    }
  }
  return __syncthreads_and(ok) != 0;
}

/// The receive phase of combine for one rank, run by `blocks` (with publish_y, the send phase
/// first). kInternode: the rows of experts on other nodes are read from this rank's
/// combine_recv[b], where they were pushed (every block waits for each pusher's signal).
template <bool kInternode>
__device__ void combine_recv(const DeviceContext& ctx, const CombineRecvParams& p,
                             device::RankBlocks blocks) {
  const int R = ctx.num_ranks, K = ctx.topk, H = ctx.hidden, me = ctx.rank, b = p.buffer;
  const int32_t slots_per_rank = ctx.local_experts * R * ctx.ll.capacity;
  // Without a hook the send phase is this kernel's first step; with one it ran in its own kernel.
  const uint64_t seq = p.publish_y ? device::read_call_seq(ctx) : ctx.ll.combine_seq[b];
  if (p.publish_y && blocks.index == 0) publish_outputs<kInternode>(ctx, b, p.y, seq);
  const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
  rdma::WarpPort port(ctx);  // kInternode only
  bool pushed = true;
  if constexpr (kInternode) {
    if (p.publish_y) {  // the send phase: every block pushes, then one block signals
      push_rows(ctx, b, p.y, blocks, port);
      pushed = transport::grid_barrier(ctx, true, blocks);
      if (pushed && blocks.index == 0) signal_rows_pushed(ctx, b, port);
    }
  }
  __shared__ const uint16_t* y_of[detail::kMaxRanks];
  // Per warp: the token's valid (slot row, weight) pairs, compacted in k order.
  __shared__ const uint16_t* rows[kMaxWarps][detail::kMaxTopk];
  __shared__ float weights[kMaxWarps][detail::kMaxTopk];

  bool ok = pushed;
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    if constexpr (kInternode) {
      if (!same_node(ctx, d)) {
        if (!rdma::wait_signal(ctx, signal_at(ctx, ctx.ll.sig_combine, b, d), 1, d,
                               Phase::kRdmaData, blocks.index)) {
          ok = false;
          continue;
        }
        const int64_t from = remote_index(d, ctx.node, ctx.node_size);
        y_of[d] = transport::peer_region<const uint16_t>(ctx, me, ctx.ll.combine_recv[b]) +
                  from * ctx.local_experts * ctx.ll.capacity * H;
        continue;
      }
    }
    if (!transport::wait_signal(ctx, FlagKind::kCombineReady, d, seq, Phase::kCombineReady,
                                blocks.index)) {
      ok = false;
      continue;
    }
    if (transport::is_masked(ctx, d)) {  // its experts' outputs contribute nothing
      y_of[d] = nullptr;
      continue;
    }
    const uint64_t* slot = transport::peer_region<uint64_t>(ctx, me, ctx.ll.peer_ptrs) +
                           (b * R + d) * detail::kPeerPtrs;
    y_of[d] = static_cast<const uint16_t*>(transport::resolve_address(ctx, d, slot[0]));
  }
  ok = __syncthreads_and(ok) != 0;

  const int warps = blockDim.x / kWarpLanes;
  const int64_t stride = static_cast<int64_t>(blocks.count) * warps;
  // One warp per piece of a token's output row (one lane step of vectors at least); the last
  // unit is partial when H is not a multiple of 128 (c_end below stops at H).
  const RowPieces pieces(p.num_tokens, stride, (H + kUnitChannels - 1) / kUnitChannels,
                         kCombineStepUnits);
  for (int64_t i = static_cast<int64_t>(blocks.index) * warps + warp; ok && i < pieces.items;
       i += stride) {
    const int64_t t = i / pieces.count;
    const int piece = static_cast<int>(i % pieces.count);
    const uint16_t* row = nullptr;
    float w = 0.0f;
    if (lane < K) {
      const int32_t sl = p.slot_of[t * K + lane];
      const uint16_t* y = sl >= 0 ? y_of[sl / slots_per_rank] : nullptr;
      if (y) {
        int64_t at = sl % slots_per_rank;
        if constexpr (kInternode) {
          // combine_recv holds [le][position]: le = at / (R*M), position = at % M.
          const int M = ctx.ll.capacity;
          if (!same_node(ctx, sl / slots_per_rank))
            at = at / (static_cast<int64_t>(R) * M) * M + at % M;
        }
        row = y + at * H;
        w = p.topk_weights ? p.topk_weights[t * K + lane] : 1.0f;
      }
    }
    const unsigned valid = __ballot_sync(kFullMask, row != nullptr);
    const int n = __popc(valid);
    if (row) {
      const int at = __popc(valid & device::lanemask_lt());
      rows[warp][at] = row;
      weights[warp][at] = w;
    }
    __syncwarp();
    const int c_end = min(H, (piece + 1) * pieces.units * kUnitChannels) / kBf16PerVec;
    for (int c = piece * pieces.units * kVectorsPerUnit + lane; c < c_end; c += kWarpLanes) {
      float acc[kBf16PerVec] = {};
      for (int k0 = 0; k0 < n; k0 += kCombineBatch) {
        int4 v[kCombineBatch];
#pragma unroll
        for (int u = 0; u < kCombineBatch; ++u)
          if (k0 + u < n) v[u] = device::ld_peer_16_any(rows[warp][k0 + u] + c * kBf16PerVec);
#pragma unroll
        for (int u = 0; u < kCombineBatch; ++u) {
          if (k0 + u >= n) break;
          float f[kBf16PerVec];
          device::unpack_bf16x8(v[u], f);
          const float wk = weights[warp][k0 + u];
#pragma unroll
          for (int j = 0; j < kBf16PerVec; ++j) acc[j] = __fmaf_rn(wk, f[j], acc[j]);
        }
      }
      *reinterpret_cast<int4*>(p.out + t * H + c * kBf16PerVec) = device::pack_bf16x8(acc);
    }
    __syncwarp();  // the lists are rewritten for the next piece
  }

  if (transport::is_last_block(ctx, blocks)) {
    // Every owner learns its y has been read; y of this rank stays until every reader is done.
    if constexpr (kInternode)
      finish_combine_internode(ctx, b, seq, blocks.index, port);
    else
      transport::signal_and_wait_all(ctx, FlagKind::kCombineDone, seq, Phase::kCombineDone,
                                     blocks.index);
    if (p.publish_y && threadIdx.x == 0) device::close_call(ctx);
  }
}

template <bool kInternode>
__global__ void __launch_bounds__(kMaxBlockThreads)
    combine_recv_kernel(DeviceContext ctx, CombineRecvParams p) {
  combine_recv<kInternode>(ctx, p, device::whole_grid());
}

/// Block b serves rank b / blocks_per_rank of a one-GPU group as its block b % blocks_per_rank.
__device__ __forceinline__ int group_rank(const GroupLaunch& g) {
  return static_cast<int>(blockIdx.x) / g.blocks_per_rank;
}
__device__ __forceinline__ device::RankBlocks group_blocks(const GroupLaunch& g) {
  return {static_cast<int>(blockIdx.x) % g.blocks_per_rank, g.blocks_per_rank};
}

__global__ void __launch_bounds__(kMaxBlockThreads)
    group_dispatch_send_kernel(const __grid_constant__ GroupDispatchSend g) {
  extern __shared__ uint32_t columns[];
  const int r = group_rank(g.launch);
  dispatch_send<false>(g.ctx[r], g.params[r], group_blocks(g.launch), columns);
}

__global__ void __launch_bounds__(kMaxBlockThreads)
    group_combine_recv_kernel(const __grid_constant__ GroupCombineRecv g) {
  const int r = group_rank(g.launch);
  combine_recv<false>(g.ctx[r], g.params[r], group_blocks(g.launch));
}

void check_grid(int blocks, int threads, const char* kernel) {
  if (blocks < 1 || threads < kWarpLanes || threads > kMaxBlockThreads || threads % kWarpLanes != 0)
    throw InvalidArgument(std::string(kernel) +
                          ": expected blocks >= 1 and threads a multiple of " +
                          std::to_string(kWarpLanes) + " in " + std::to_string(kWarpLanes) + ".." +
                          std::to_string(kMaxBlockThreads) + ", got " + std::to_string(blocks) +
                          " x " + std::to_string(threads));
}

}  // namespace

void launch_dispatch_send(const DeviceContext& ctx, const DispatchSendParams& params, int blocks,
                          int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::dispatch_send_kernel");
  const size_t smem = layout::column_smem_bytes(ctx.num_experts, threads);
  if (ctx.num_nodes > 1)
    dispatch_send_kernel<true><<<blocks, threads, smem, stream>>>(ctx, params);
  else
    dispatch_send_kernel<false><<<blocks, threads, smem, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::dispatch_send_kernel");
}

void launch_dispatch_recv(const DeviceContext& ctx, const DispatchRecvParams& params,
                          cudaStream_t stream) {
  if (ctx.num_nodes > 1)
    dispatch_recv_kernel<true><<<1, kRecvThreads, 0, stream>>>(ctx, params);
  else
    dispatch_recv_kernel<false><<<1, kRecvThreads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::dispatch_recv_kernel");
}

void launch_combine_send(const DeviceContext& ctx, const CombineSendParams& params, int blocks,
                         int threads, cudaStream_t stream) {
  if (ctx.num_nodes > 1) {  // the rows for other nodes are pushed by the whole grid
    check_grid(blocks, threads, "ll::combine_send_kernel");
    combine_send_kernel<true><<<blocks, threads, 0, stream>>>(ctx, params);
  } else {
    combine_send_kernel<false><<<1, kCombineSendThreads, 0, stream>>>(ctx, params);
  }
  MOECOMM_LAUNCH_CHECK("ll::combine_send_kernel");
}

void launch_combine_recv(const DeviceContext& ctx, const CombineRecvParams& params, int blocks,
                         int threads, cudaStream_t stream) {
  check_grid(blocks, threads, "ll::combine_recv_kernel");
  if (ctx.num_nodes > 1)
    combine_recv_kernel<true><<<blocks, threads, 0, stream>>>(ctx, params);
  else
    combine_recv_kernel<false><<<blocks, threads, 0, stream>>>(ctx, params);
  MOECOMM_LAUNCH_CHECK("ll::combine_recv_kernel");
}

void launch_group_dispatch(const GroupDispatchSend& group, int threads, cudaStream_t stream) {
  const int blocks = group.launch.ranks * group.launch.blocks_per_rank;
  check_grid(blocks, threads, "ll::group_dispatch_send_kernel");
  group_dispatch_send_kernel<<<
      blocks, threads, layout::column_smem_bytes(group.ctx[0].num_experts, threads), stream>>>(
      group);
  MOECOMM_LAUNCH_CHECK("ll::group_dispatch_send_kernel");
}

void launch_group_combine(const GroupCombineRecv& group, int threads, cudaStream_t stream) {
  const int blocks = group.launch.ranks * group.launch.blocks_per_rank;
  check_grid(blocks, threads, "ll::group_combine_recv_kernel");
  group_combine_recv_kernel<<<blocks, threads, 0, stream>>>(group);
  MOECOMM_LAUNCH_CHECK("ll::group_combine_recv_kernel");
}

void preload_kernels() {
  cudaFuncAttributes attr;
  for (auto* kernel : {dispatch_send_kernel<false>, dispatch_send_kernel<true>}) {
    MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(layout::kColumnSmemLimit)));
  }
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_recv_kernel<false>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, dispatch_recv_kernel<true>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_send_kernel<false>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_send_kernel<true>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_recv_kernel<false>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, combine_recv_kernel<true>));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, group_dispatch_send_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncGetAttributes(&attr, group_combine_recv_kernel));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(group_dispatch_send_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(layout::kColumnSmemLimit)));
}

}  // namespace moecomm::ll
