// hbm_mix: how fast the GPU's memory moves the traffic mixes of dispatch and combine, with the
// SMs a group of 8 ranks gives them. ep_bench's "% copy" divides by the device-to-device copy
// rate (one byte read per byte written); dispatch writes each row it reads to several ranks and
// combine reads several rows per row it writes, so their floors are the rates of those mixes:
//   fan-out N: a warp reads a 14336-byte bf16 row and writes half its size (the fp8 row) to N
//              rows spread over the buffer (dispatch with N destination ranks);
//   fan-in N:  a warp reads N 14336-byte rows spread over the buffer and writes one (combine).
//   quant N:   fan-out N where the warp quantises the row to e4m3 on the way, with the library's
//              own quantize_groups (device/row_ops.cuh) and a scale per 128 channels written
//              beside each destination row: HT dispatch's fp8 path without its routing. N = 0:
//              the loads and the quantisation alone (nothing is written).
//   quant-bulk N: quant N with the rows leaving through a staging ring in shared memory, one
//              bulk (TMA) store per destination and step (staged_rows.cuh, as HT dispatch
//              wrote them at few SMs a rank until bench/NOTES.md v26).
//   quant-ord, quant-bulk-ord: the same with each destination's rows in a region of their own,
//              row r beside row r + 1, as dispatch lays them out (neighbouring tokens, handled
//              at the same time, land side by side).
//   quant-rt, quant-bulk-rt: quant and quant-bulk with dispatch's routing: each row picks 8 of
//              256 experts (seeded, no repeats), 32 a rank over 8 ranks, and goes to each rank it
//              picked (1 to 8, in rank order); rank d's rows lie in its own region in row order,
//              a row at the number of earlier rows that go to d (dispatch's layout).
//   quant-rt-meta, quant-bulk-rt-meta: the same with dispatch's metadata stored first at every
//              destination: 8 int64 expert ids, 8 float weights and the int32 source row.
//   quant-rt-pro, quant-bulk-rt-pro: the meta mixes with dispatch's prologue: a warp takes its
//              rows from a counter (device::WorkQueue, the next drawn before the current is
//              written; reset by a memset in the timed launch) and loads each row's inputs one
//              row ahead: an int32 record of its row at each rank (-1: not sent; the destinations
//              are the ranks whose record is >= 0), 8 int64 expert ids and 8 float weights, from
//              which the metadata's values come. These loads, 128 bytes a row, count as read.
//   quant-rt-src, quant-bulk-rt-src: the meta mixes with dispatch's layout over 8 source ranks:
//              row r is token r / 8 of source r % 8 (the rows handled at once come from every
//              source, as when the 8 ranks' kernels run together), and rank d's region holds
//              source 0's rows, then source 1's, and so on, each in token order.
//   quant-rt-src-pro, quant-bulk-rt-src-pro: both.
//   quant-rt-src-pro-8k, quant-bulk-rt-src-pro-8k: the same rows as kRanks kernels on kRanks
//              streams, kernel s on blocks / kRanks blocks with source s's rows and a work queue
//              of its own, as the group's ranks run on one GPU (all of them on the GPU at once).
//   quant-rt-src-pro-8k-rts, quant-bulk-rt-src-pro-8k-rts: the -8k mixes with the row's sizes
//              (groups, bytes in and out) as run-time values, as dispatch has them.
//   quant-rt-src-pro-8k-rnd, quant-bulk-rt-src-pro-8k-rnd: the -8k mixes reading random rows
//              (bf16 in [-4, 4), hashed) instead of every other mix's constant pattern, as
//              ep_bench's inputs are.
//   fan-in-ll, fan-in-ll-2v: LL combine's receive step at 128 tokens a rank: 8 x 128 output rows,
//              each the sum of 8 rows spread over the buffer, every row split into pieces over
//              the warps as LL splits it (ceil(warps / rows) pieces); a lane loads one (-2v: two)
//              16-byte vectors of each source a step. Timed inside the kernel, from the first
//              block's start to the last block's end (globaltimer), as ep_bench's stream part.
//   fan-out-ll-pP, -u4-pP, -plain-pP: LL dispatch's send step at 128 tokens a rank, as the
//              one-launch form runs it: the blocks split evenly over 8 source ranks, each row of a
//              source cut into P pieces of whole 128-channel groups, a warp per piece; the piece is
//              read once, quantised with quantize_groups (-u4: 4 steps loaded ahead instead of the
//              library's 2; -plain: not quantised, two input vectors make one output vector) and
//              written with its scales to each of the row's 8 slots (one message per token and
//              expert, the same experts as the routed mixes), a slot at expert-major
//              d, local expert, source, position (LL's layout, 128 slots a source). P = 2 is what
//              LL's RowPieces picks at 16 SMs a rank. Timed inside the kernel, as fan-in-ll.
// A row's destinations are computed once (lane j holds the j-th; with the prologue, lane d holds
// rank d's), then shuffled, as dispatch does.
// Each runs on 32, 64 and 128 blocks of 512 threads (4, 8 and 16 SMs for each of 8 ranks); the
// routed mixes on 64 and 128, once, with fan 0 in the table and their mean fan-out printed above.
// Usage: hbm_mix [--device D] [--only TEXT] (only the mixes whose name contains TEXT). Prints GB/s
// (bytes read + written), the fraction of the copy rate and the time in us, median of the timed
// runs.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "device/row_ops.cuh"
#include "staged_rows.cuh"

namespace {

constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kRowVecs = 14336 / 16;  // a bf16 row of hidden 7168 in 16-byte vectors
constexpr int kOutVecs = kRowVecs / 2;
constexpr int kRows = 8 * 4096;  // rows read (fan-out) or written (fan-in): 8 ranks x 4096 tokens
constexpr int kUnroll = 4;       // 16-byte loads in flight per lane, as the library's row copy
constexpr int kIters = 20;
constexpr int kGroups = kRowVecs * 8 / 128;  // scale groups of 128 channels in a row
constexpr int kQuantizeUnroll = moecomm::device::quantize_load_steps(kThreads);  // as dispatch
constexpr int kRanks = 8;      // routed mixes: destination ranks
constexpr int kExperts = 256;  // experts over the ranks, kExperts / kRanks each
constexpr int kTopk = 8;       // experts a row picks, without repeats
constexpr int kLocalExperts = kExperts / kRanks;
static_assert(kRanks <= 32 && kTopk <= 32, "a lane holds each destination and each expert");
static_assert(kRows % kRanks == 0, "the -src mixes: kRanks sources of kRows / kRanks tokens");

/// Scatters row r's j-th destination over `rows` rows (a fixed odd multiplier: every row once).
__device__ __forceinline__ int64_t spread(int64_t r, int j, int64_t rows) {
  return (r * 7919 + static_cast<int64_t>(j) * 104729) % rows;
}

/// Where dispatch puts them instead: destination j's rows in a region of their own, row r
/// beside row r + 1 (the rows of neighbouring tokens are written at the same time).
__device__ __forceinline__ int64_t in_order(int64_t r, int j, int64_t rows) {
  return static_cast<int64_t>(j) * (rows / 8) + r;
}

__global__ void __launch_bounds__(kThreads)
    fan_out(const int4* __restrict__ src, int4* __restrict__ dst, int fan, int64_t dst_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    const int4* row = src + r * kRowVecs;
    const int64_t mine = lane < fan ? spread(r, lane, dst_rows) : 0;
    for (int base = 0; base < kOutVecs; base += 32 * kUnroll) {
      int4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < kOutVecs) {  // two input vectors make one output vector (bf16 -> fp8)
          const int4 a = row[2 * i], b = row[2 * i + 1];
          v[u] = make_int4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
        }
      }
      for (int j = 0; j < fan; ++j) {
        int4* out = dst + __shfl_sync(0xffffffffu, mine, j) * kOutVecs;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i < kOutVecs) out[i] = v[u];
        }
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    fan_out_quantize(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                     float* __restrict__ scales, int fan, int64_t dst_rows, bool adjacent) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    const int64_t mine =
        lane < fan ? (adjacent ? in_order(r, lane, dst_rows) : spread(r, lane, dst_rows)) : 0;
    moecomm::device::quantize_groups<kQuantizeUnroll>(
        src + r * kRowVecs, kGroups, false, lane,
        [&](int g, int sub, uint4 q, float scale, bool valid) {
          for (int j = 0; j < fan; ++j) {
            const int64_t row = __shfl_sync(0xffffffffu, mine, j);
            if (!valid) continue;
            *reinterpret_cast<uint4*>(dst + row * (kOutVecs * 16) + g * 128 + sub * 16) = q;
            if (sub == 0) scales[row * kGroups + g] = scale;
          }
        });
  }
}

using Staging = epb::QuantizeStaging<kQuantizeUnroll>;
constexpr int kStagingBytes = kWarpsPerBlock * Staging::kWarpBytes;

/// quant, with the rows leaving through the library's staging ring (bulk stores).
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_staged(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                            float* __restrict__ scales, int fan, int64_t dst_rows, bool adjacent) {
  extern __shared__ __align__(16) uint8_t rings[];
  const int lane = threadIdx.x & 31;
  Staging staging{rings + (threadIdx.x / 32) * Staging::kWarpBytes};
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    moecomm::device::RowDestinations to;
    for (int j = 0; j < fan; ++j) {
      const int64_t row = adjacent ? in_order(r, j, dst_rows) : spread(r, j, dst_rows);
      to.add(dst + row * (kOutVecs * 16), scales + row * kGroups, lane);
    }
    epb::quantize_row_staged<kQuantizeUnroll>(src + r * kRowVecs, kGroups, false, lane, staging,
                                              to);
  }
  moecomm::device::bulk_wait_all();
}

/// The routed mixes' table: row r goes to counts[r] destinations, the j-th at output row
/// rows[r * kRanks + j] (ranks in ascending order, each rank's region offset included).
struct Routes {
  const int64_t* rows;
  const int32_t* counts;
};

/// Dispatch's metadata regions, kRanks * kRows rows each: kTopk expert ids and weights a row,
/// and its source row.
struct Metadata {
  int64_t* topk_idx;
  float* weights;
  int32_t* src_token;
};

/// Row r's destinations from the table: the count (the same in every lane) and, in lane j < n,
/// the j-th output row.
__device__ __forceinline__ int load_route(const Routes& routes, int64_t r, int lane,
                                          int64_t& mine) {
  const int n = routes.counts[r];
  mine = lane < n ? routes.rows[r * kRanks + lane] : 0;
  return n;
}

/// Row r's metadata to each of its n destinations with plain stores, as dispatch_token writes
/// them before the row. The values are placeholders (the stores, not the values, are measured).
__device__ __forceinline__ void store_metadata(const Metadata& meta, int64_t r, int n, int64_t mine,
                                               int lane) {
  for (int j = 0; j < n; ++j) {  // warp-uniform: every lane takes part in the shuffle
    const int64_t row = __shfl_sync(0xffffffffu, mine, j);
    if (lane < kTopk) {
      meta.topk_idx[row * kTopk + lane] = lane;
      meta.weights[row * kTopk + lane] = 1.0f / kTopk;
    }
    if (lane == 0) meta.src_token[row] = static_cast<int32_t>(r);
  }
}

/// quant with the destinations from the routing table, and dispatch's metadata if `meta`.
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_routed(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                            float* __restrict__ scales, Routes routes, Metadata metadata,
                            bool meta) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    int64_t mine;
    const int n = load_route(routes, r, lane, mine);
    if (meta) store_metadata(metadata, r, n, mine, lane);
    moecomm::device::quantize_groups<kQuantizeUnroll>(
        src + r * kRowVecs, kGroups, false, lane,
        [&](int g, int sub, uint4 q, float scale, bool valid) {
          for (int j = 0; j < n; ++j) {
            const int64_t row = __shfl_sync(0xffffffffu, mine, j);
            if (!valid) continue;
            *reinterpret_cast<uint4*>(dst + row * (kOutVecs * 16) + g * 128 + sub * 16) = q;
            if (sub == 0) scales[row * kGroups + g] = scale;
          }
        });
  }
}

/// quant-bulk with the destinations from the routing table, and dispatch's metadata if `meta`.
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_staged_routed(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                                   float* __restrict__ scales, Routes routes, Metadata metadata,
                                   bool meta) {
  extern __shared__ __align__(16) uint8_t rings[];
  const int lane = threadIdx.x & 31;
  Staging staging{rings + (threadIdx.x / 32) * Staging::kWarpBytes};
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    int64_t mine;
    const int n = load_route(routes, r, lane, mine);
    if (meta) store_metadata(metadata, r, n, mine, lane);
    moecomm::device::RowDestinations to;
    for (int j = 0; j < n; ++j) {
      const int64_t row = __shfl_sync(0xffffffffu, mine, j);
      to.add(dst + row * (kOutVecs * 16), scales + row * kGroups, lane);
    }
    epb::quantize_row_staged<kQuantizeUnroll>(src + r * kRowVecs, kGroups, false, lane, staging,
                                              to);
  }
  moecomm::device::bulk_wait_all();
}

/// The prologue mixes' inputs, read per row as dispatch reads them per token: the routing
/// record (row r's output row at rank d, or -1), the expert ids and weights, and the work
/// queue's counter (zero at launch).
struct Prologue {
  const int32_t* record;      // [kRows][kRanks]
  const int64_t* topk_idx;    // [kRows][kTopk]
  const float* topk_weights;  // [kRows][kTopk]
  uint32_t* counter;
  int first_row = 0;  // the kernel's rows: first_row, first_row + row_stride, ... (< kRows)
  int row_stride = 1;
  int groups = kGroups;  // a row's scale groups, for the kernels that take it at run time
};

/// What a warp loads about row r before writing it (dispatch's TokenLoads): lane k < kTopk the
/// k-th expert and weight, lane d < kRanks the row at rank d (or -1).
struct RowLoads {
  int64_t r = 0;
  int64_t expert = -1;
  float weight = 0.0f;
  int32_t row = -1;
};

__device__ __forceinline__ RowLoads load_row(const Prologue& p, int64_t r, int lane) {
  RowLoads l;
  l.r = r;
  if (lane < kTopk) {
    l.expert = p.topk_idx[r * kTopk + lane];
    l.weight = p.topk_weights[r * kTopk + lane];
  }
  if (lane < kRanks) l.row = p.record[r * kRanks + lane];
  return l;
}

/// Runs body(l, mask) for each row the warp draws from the work queue, as dispatch_kernel does:
/// the next row is drawn and its inputs loaded before the current one is written. `mask`: the
/// ranks the row goes to (the same in every lane).
template <typename Body>
__device__ __forceinline__ void drain_queue(const Prologue& p, int lane, Body&& body) {
  const moecomm::device::WorkQueue queue{p.counter};
  const auto row_of = [&](uint32_t drawn_unit) {
    return static_cast<int64_t>(queue.unit(drawn_unit)) * p.row_stride + p.first_row;
  };
  int64_t r = row_of(queue.draw(lane));
  uint32_t drawn = queue.draw(lane);
  RowLoads current = r < kRows ? load_row(p, r, lane) : RowLoads{};
  while (r < kRows) {  // warp-uniform: r comes from lane 0
    const int64_t r_next = row_of(drawn);
    drawn = queue.draw(lane);
    const RowLoads next = r_next < kRows ? load_row(p, r_next, lane) : RowLoads{};
    const unsigned mask = __ballot_sync(0xffffffffu, current.row >= 0);
    if (mask != 0) body(current, mask);
    current = next;
    r = r_next;
  }
}

/// The row at the lowest rank left in m (taken out of m), read from that rank's lane: every lane
/// takes part in the shuffle.
__device__ __forceinline__ int64_t pop_row(const RowLoads& l, unsigned& m) {
  const int d = __ffs(static_cast<int>(m)) - 1;
  m &= m - 1;
  return __shfl_sync(0xffffffffu, l.row, d);
}

/// Dispatch's metadata from the loaded inputs: at rank d, the ids of d's experts (local, -1
/// elsewhere), their weights (0 elsewhere), and the source row.
__device__ __forceinline__ void store_loaded_metadata(const Metadata& meta, const RowLoads& l,
                                                      unsigned mask, int lane) {
  for (unsigned m = mask; m;) {
    const int d = __ffs(static_cast<int>(m)) - 1;
    const int64_t row = pop_row(l, m);
    if (lane < kTopk) {
      const bool here = l.expert >= 0 && l.expert < kExperts && l.expert / kLocalExperts == d;
      meta.topk_idx[row * kTopk + lane] = here ? l.expert - int64_t{d} * kLocalExperts : -1;
      meta.weights[row * kTopk + lane] = here ? l.weight : 0.0f;
    }
    if (lane == 0) meta.src_token[row] = static_cast<int32_t>(l.r);
  }
}

/// A row's sizes: compile-time constants, or (kRunTime, as dispatch has them) from the
/// kernel's arguments.
template <bool kRunTime>
struct RowSizes {
  int groups;
  __device__ explicit RowSizes(const Prologue& p) : groups(kRunTime ? p.groups : kGroups) {}
  __device__ int64_t in_vecs() const { return int64_t{groups} * 16; }  // 128 bf16 a group
  __device__ int64_t out_bytes() const { return int64_t{groups} * 128; }
};

/// quant-rt-meta with dispatch's prologue: rows from the work queue, destinations and metadata
/// from the loaded inputs.
template <bool kRunTimeSizes>
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_routed_pro(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                                float* __restrict__ scales, Prologue prologue, Metadata metadata) {
  const int lane = threadIdx.x & 31;
  const RowSizes<kRunTimeSizes> size(prologue);
  drain_queue(prologue, lane, [&](const RowLoads& l, unsigned mask) {
    store_loaded_metadata(metadata, l, mask, lane);
    moecomm::device::quantize_groups<kQuantizeUnroll>(
        src + l.r * size.in_vecs(), size.groups, false, lane,
        [&](int g, int sub, uint4 q, float scale, bool valid) {
          for (unsigned m = mask; m;) {
            const int64_t row = pop_row(l, m);
            if (!valid) continue;
            *reinterpret_cast<uint4*>(dst + row * size.out_bytes() + g * 128 + sub * 16) = q;
            if (sub == 0) scales[row * size.groups + g] = scale;
          }
        });
  });
}

/// quant-bulk-rt-meta with dispatch's prologue.
template <bool kRunTimeSizes>
__global__ void __launch_bounds__(kThreads)
    fan_out_quantize_staged_routed_pro(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                                       float* __restrict__ scales, Prologue prologue,
                                       Metadata metadata) {
  extern __shared__ __align__(16) uint8_t rings[];
  const int lane = threadIdx.x & 31;
  Staging staging{rings + (threadIdx.x / 32) * Staging::kWarpBytes};
  const RowSizes<kRunTimeSizes> size(prologue);
  drain_queue(prologue, lane, [&](const RowLoads& l, unsigned mask) {
    store_loaded_metadata(metadata, l, mask, lane);
    moecomm::device::RowDestinations to;
    for (unsigned m = mask; m;) {
      const int64_t row = pop_row(l, m);
      to.add(dst + row * size.out_bytes(), scales + row * size.groups, lane);
    }
    epb::quantize_row_staged<kQuantizeUnroll>(src + l.r * size.in_vecs(), size.groups, false, lane,
                                              staging, to);
  });
  moecomm::device::bulk_wait_all();
}

/// The routed mixes' table on the host: each row picks kTopk distinct experts (a seeded
/// generator), goes to the ranks that own them, and lands at each such rank d in d's region at
/// the number of earlier rows that go to d.
/// by_source (the -src mixes): row r is token r / kRanks of source r % kRanks, and d's region
/// holds each source's rows in a region of their own (source order), in token order.
struct RoutingTable {
  std::vector<int64_t> rows = std::vector<int64_t>(int64_t{kRows} * kRanks, 0);
  std::vector<int32_t> ranks = std::vector<int32_t>(int64_t{kRows} * kRanks, 0);  // of rows[]
  std::vector<int32_t> counts = std::vector<int32_t>(kRows, 0);
  std::vector<int64_t> experts = std::vector<int64_t>(int64_t{kRows} * kTopk, 0);
  int64_t destinations = 0;  // sum of the counts
};

RoutingTable make_routing_table(bool by_source) {
  RoutingTable t;
  std::mt19937 rng(12345);
  std::vector<unsigned> rank_masks(kRows, 0);
  for (int64_t r = 0; r < kRows; ++r) {
    bool picked[kExperts] = {};
    for (int k = 0; k < kTopk; ++k) {
      int e;
      do {
        e = static_cast<int>(rng() % kExperts);  // 2^32 is a multiple of kExperts: no bias
      } while (picked[e]);
      picked[e] = true;
      t.experts[r * kTopk + k] = e;
      rank_masks[r] |= 1u << (e / kLocalExperts);
    }
  }
  // next[s][d]: where source s's next row lands in d's region. by_source: it starts at the rows
  // that sources before s send to d; otherwise every row counts as source 0's.
  int64_t next[kRanks][kRanks] = {};
  if (by_source) {
    int64_t sent[kRanks][kRanks] = {};  // [s][d]: rows source s sends to d
    for (int64_t r = 0; r < kRows; ++r)
      for (int d = 0; d < kRanks; ++d) sent[r % kRanks][d] += (rank_masks[r] >> d) & 1u;
    for (int s = 1; s < kRanks; ++s)
      for (int d = 0; d < kRanks; ++d) next[s][d] = next[s - 1][d] + sent[s - 1][d];
  }
  for (int64_t r = 0; r < kRows; ++r) {
    const int s = by_source ? static_cast<int>(r % kRanks) : 0;
    for (int d = 0; d < kRanks; ++d) {
      if (!((rank_masks[r] >> d) & 1u)) continue;
      t.ranks[r * kRanks + t.counts[r]] = d;
      t.rows[r * kRanks + t.counts[r]++] = int64_t{d} * kRows + next[s][d]++;
    }
    t.destinations += t.counts[r];
  }
  return t;
}

/// The prologue mixes' record of a table: [r][d] the output row at rank d, or -1.
std::vector<int32_t> make_records(const RoutingTable& t) {
  std::vector<int32_t> record(int64_t{kRows} * kRanks, -1);
  for (int64_t r = 0; r < kRows; ++r)
    for (int j = 0; j < t.counts[r]; ++j)
      record[r * kRanks + t.ranks[r * kRanks + j]] = static_cast<int32_t>(t.rows[r * kRanks + j]);
  return record;
}

/// Random bf16 values in [-4, 4): a hash of each element's index.
__global__ void fill_random_bf16(uint16_t* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ static_cast<uint32_t>(i >> 32);
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float v = (h & 0xffffffu) * (8.0f / 16777216.0f) - 4.0f;
    out[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);  // bf16: the float's top half
  }
}

__global__ void __launch_bounds__(kThreads)
    fan_in(const int4* __restrict__ src, int4* __restrict__ dst, int fan, int64_t src_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; r < kRows; r += warps) {
    for (int i = lane; i < kRowVecs; i += 32) {
      int4 acc = make_int4(0, 0, 0, 0);
      int4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < fan) v[j] = src[spread(r, j, src_rows) * kRowVecs + i];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (j < fan)
          acc = make_int4(acc.x + v[j].x, acc.y + v[j].y, acc.z + v[j].z, acc.w + v[j].w);
      dst[r * kRowVecs + i] = acc;
    }
  }
}

constexpr int kLlTokens = 128;               // LL mixes: tokens a rank
constexpr int kLlRows = kRanks * kLlTokens;  // their rows: LL combine's outputs, dispatch's inputs

/// fan-in-ll (the header says what it models); span[0] / span[1]: the earliest block start and
/// the latest block end (globaltimer ns), min / max over blocks.
template <int kV>
__global__ void __launch_bounds__(kThreads)
    fan_in_pieces(const int4* __restrict__ src, int4* __restrict__ dst, int64_t src_rows,
                  unsigned long long* span) {
  if (threadIdx.x == 0) atomicMin(&span[0], moecomm::device::global_timer_ns());
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  int64_t wanted_pieces = (warps + kLlRows - 1) / kLlRows;  // pieces a row, as LL's RowPieces
  if (wanted_pieces > kRowVecs / 32) wanted_pieces = kRowVecs / 32;
  const int count = wanted_pieces < 1 ? 1 : static_cast<int>(wanted_pieces);
  const int per = (kRowVecs + count - 1) / count;  // vectors a piece
  const int64_t items = int64_t{kLlRows} * count;
  for (int64_t i = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; i < items; i += warps) {
    const int64_t r = i / count;
    const int c0 = static_cast<int>(i % count) * per, c1 = min(kRowVecs, c0 + per);
    for (int c = c0 + lane; c < c1; c += 32 * kV) {
      int4 v[kTopk][kV];
#pragma unroll
      for (int j = 0; j < kTopk; ++j)
#pragma unroll
        for (int u = 0; u < kV; ++u)
          if (c + u * 32 < c1) v[j][u] = src[spread(r, j, src_rows) * kRowVecs + c + u * 32];
#pragma unroll
      for (int u = 0; u < kV; ++u) {
        if (c + u * 32 >= c1) continue;
        int4 acc = make_int4(0, 0, 0, 0);
#pragma unroll
        for (int j = 0; j < kTopk; ++j)
          acc =
              make_int4(acc.x + v[j][u].x, acc.y + v[j][u].y, acc.z + v[j][u].z, acc.w + v[j][u].w);
        dst[r * kRowVecs + c + u * 32] = acc;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&span[1], moecomm::device::global_timer_ns());
}

/// fan-out-ll (the header says what it models); slots: [kLlRows][kTopk] the output row of each
/// message; span as fan_in_pieces'.
template <int kSteps, bool kQuantize>
__global__ void __launch_bounds__(kThreads)
    fan_out_pieces(const int4* __restrict__ src, uint8_t* __restrict__ dst,
                   float* __restrict__ scales, const int64_t* __restrict__ slots, int pieces,
                   unsigned long long* span) {
  if (threadIdx.x == 0) atomicMin(&span[0], moecomm::device::global_timer_ns());
  const int lane = threadIdx.x & 31;
  const int blocks_per_source = gridDim.x / kRanks;  // block b serves source b / blocks_per_source
  const int source = blockIdx.x / blocks_per_source;
  const int64_t warps = int64_t{blocks_per_source} * kWarpsPerBlock;
  const int per = (kGroups + pieces - 1) / pieces;  // groups a piece
  const int64_t items = int64_t{kLlTokens} * pieces;
  for (int64_t i = (blockIdx.x % blocks_per_source) * kWarpsPerBlock + threadIdx.x / 32; i < items;
       i += warps) {
    const int64_t r = int64_t{source} * kLlTokens + i / pieces;
    const int g0 = static_cast<int>(i % pieces) * per, groups = min(per, kGroups - g0);
    const int64_t mine = lane < kTopk ? slots[r * kTopk + lane] : 0;
    const int4* row = src + r * kRowVecs + g0 * 16;  // 16 input vectors a group
    if constexpr (kQuantize) {
      moecomm::device::quantize_groups<kSteps>(
          row, groups, false, lane, [&](int g, int sub, uint4 q, float scale, bool valid) {
            for (int j = 0; j < kTopk; ++j) {
              const int64_t slot = __shfl_sync(0xffffffffu, mine, j);
              if (!valid) continue;
              *reinterpret_cast<uint4*>(dst + slot * (kOutVecs * 16) + (g0 + g) * 128 + sub * 16) =
                  q;
              if (sub == 0) scales[slot * kGroups + g0 + g] = scale;
            }
          });
    } else {
      const int out_vecs = groups * 8;  // 8 output vectors a group
      for (int base = 0; base < out_vecs; base += 32 * kSteps) {
        int4 v[kSteps];
#pragma unroll
        for (int u = 0; u < kSteps; ++u) {
          const int k = base + u * 32 + lane;
          if (k < out_vecs) {
            const int4 a = row[2 * k], b = row[2 * k + 1];
            v[u] = make_int4(a.x ^ b.x, a.y ^ b.y, a.z ^ b.z, a.w ^ b.w);
          }
        }
        for (int j = 0; j < kTopk; ++j) {
          int4* out =
              reinterpret_cast<int4*>(dst + __shfl_sync(0xffffffffu, mine, j) * (kOutVecs * 16)) +
              g0 * 8;
#pragma unroll
          for (int u = 0; u < kSteps; ++u) {
            const int k = base + u * 32 + lane;
            if (k < out_vecs) out[k] = v[u];
          }
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicMax(&span[1], moecomm::device::global_timer_ns());
}

/// Median over kIters launches of the span a kernel records (first block start to last block
/// end), in ms.
template <typename Launch>
float median_span_ms(unsigned long long* span, Launch launch) {
  const unsigned long long reset[2] = {~0ull, 0ull};
  std::vector<float> ms(kIters + 1);
  for (float& m : ms) {  // the first is a warm-up
    MOECOMM_CUDA_CHECK(cudaMemcpy(span, reset, sizeof(reset), cudaMemcpyHostToDevice));
    launch();
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
    unsigned long long got[2];
    MOECOMM_CUDA_CHECK(cudaMemcpy(got, span, sizeof(got), cudaMemcpyDeviceToHost));
    m = static_cast<float>(got[1] - got[0]) * 1e-6f;
  }
  ms.erase(ms.begin());
  std::sort(ms.begin(), ms.end());
  return ms[kIters / 2];
}

/// Median milliseconds of kIters runs of launch() (after one warm-up), timed by events.
template <typename Launch>
float median_ms(Launch launch) {
  cudaEvent_t start, stop;
  MOECOMM_CUDA_CHECK(cudaEventCreate(&start));
  MOECOMM_CUDA_CHECK(cudaEventCreate(&stop));
  launch();  // warm-up
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(kIters);
  for (float& m : ms) {
    MOECOMM_CUDA_CHECK(cudaEventRecord(start));
    launch();
    MOECOMM_CUDA_CHECK(cudaEventRecord(stop));
    MOECOMM_CUDA_CHECK(cudaEventSynchronize(stop));
    MOECOMM_CUDA_CHECK(cudaEventElapsedTime(&m, start, stop));
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(ms.begin(), ms.end());
  return ms[kIters / 2];
}

}  // namespace

int main(int argc, char** argv) try {
  // --only TEXT is this tool's own; the rest is the device option.
  std::string only;
  std::vector<char*> args{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--only" && i + 1 < argc)
      only = argv[++i];
    else
      args.push_back(argv[i]);
  }
  const auto wanted = [&](const char* name) {
    return only.empty() || std::string(name).find(only) != std::string::npos;
  };
  const int device =
      epb::parse_device_option(static_cast<int>(args.size()), args.data(), "hbm_mix");
  if (device < 0) {
    std::fprintf(stderr, "       hbm_mix [--device D] [--only TEXT]\n");
    return 2;
  }
  MOECOMM_CUDA_CHECK(cudaSetDevice(device));
  cudaDeviceProp prop;
  MOECOMM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));

  constexpr int kMaxFan = 8;
  const int64_t row_bytes = int64_t{kRowVecs} * 16, out_bytes = int64_t{kOutVecs} * 16;
  // Fan-out writes kRows * fan rows of out_bytes; fan-in reads kRows * fan rows of row_bytes.
  // Sized for the largest fan so that rows are spread over as much memory as the ops touch.
  epb::DeviceBuffer<int4> big(kRows * int64_t{kMaxFan} * kRowVecs);
  epb::DeviceBuffer<int4> rows(int64_t{kRows} * kRowVecs);
  const int64_t out_rows = big.bytes() / out_bytes;  // output rows of the fan-out mixes
  auto* const out = reinterpret_cast<uint8_t*>(big.get());
  epb::DeviceBuffer<float> scales(out_rows * kGroups);  // quant: one per output row
  MOECOMM_CUDA_CHECK(cudaMemset(big.get(), 1, big.bytes()));
  MOECOMM_CUDA_CHECK(cudaMemset(rows.get(), 2, rows.bytes()));
  epb::DeviceBuffer<int4> random_rows(int64_t{kRows} * kRowVecs);  // the -rnd mixes' inputs
  fill_random_bf16<<<1024, 256>>>(reinterpret_cast<uint16_t*>(random_rows.get()),
                                  random_rows.bytes() / 2);
  MOECOMM_LAUNCH_CHECK("fill_random_bf16");

  // Routed mixes: the table, and dispatch's metadata regions (kRanks regions of kRows rows).
  // The -src mixes' table picks the same experts (the same destinations, in other rows).
  const RoutingTable table = make_routing_table(false), table_src = make_routing_table(true);
  const int64_t routed_rows = int64_t{kRanks} * kRows;
  if (out_rows < routed_rows)
    throw std::runtime_error("hbm_mix: the buffer holds fewer output rows than the routed mixes");
  epb::DeviceBuffer<int64_t> route_rows(table.rows.size()), route_rows_src(table_src.rows.size());
  epb::DeviceBuffer<int32_t> route_counts(table.counts.size());
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(route_rows.get(), table.rows.data(), route_rows.bytes(), cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(cudaMemcpy(route_rows_src.get(), table_src.rows.data(), route_rows_src.bytes(),
                                cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(cudaMemcpy(route_counts.get(), table.counts.data(), route_counts.bytes(),
                                cudaMemcpyHostToDevice));
  epb::DeviceBuffer<int64_t> meta_idx(routed_rows * kTopk);
  epb::DeviceBuffer<float> meta_weights(routed_rows * kTopk);
  epb::DeviceBuffer<int32_t> meta_src(routed_rows);
  const Routes routes{route_rows.get(), route_counts.get()};
  const Routes routes_src{route_rows_src.get(), route_counts.get()};
  const Metadata metadata{meta_idx.get(), meta_weights.get(), meta_src.get()};

  // The prologue mixes' inputs: each table's records, the expert ids, weights (seeded) and the
  // work queue's counter.
  const std::vector<int32_t> records = make_records(table), records_src = make_records(table_src);
  std::vector<float> weights(table.experts.size());
  std::mt19937 weight_rng(54321);
  std::uniform_real_distribution<float> weight_dist(0.0f, 1.0f);
  for (float& w : weights) w = weight_dist(weight_rng);
  epb::DeviceBuffer<int32_t> record(records.size()), record_src(records_src.size());
  epb::DeviceBuffer<int64_t> topk_idx(table.experts.size());
  epb::DeviceBuffer<float> topk_weights(weights.size());
  epb::DeviceBuffer<uint32_t> counter(1), counters(kRanks);
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(record.get(), records.data(), record.bytes(), cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(record_src.get(), records_src.data(), record_src.bytes(), cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(topk_idx.get(), table.experts.data(), topk_idx.bytes(), cudaMemcpyHostToDevice));
  MOECOMM_CUDA_CHECK(
      cudaMemcpy(topk_weights.get(), weights.data(), topk_weights.bytes(), cudaMemcpyHostToDevice));
  const Prologue prologue{record.get(), topk_idx.get(), topk_weights.get(), counter.get()};
  const Prologue prologue_src{record_src.get(), topk_idx.get(), topk_weights.get(), counter.get()};
  std::vector<cudaStream_t> streams(kRanks);  // blocking streams: ordered with the legacy stream
  for (cudaStream_t& st : streams) MOECOMM_CUDA_CHECK(cudaStreamCreate(&st));

  const int64_t copy_bytes = rows.bytes();
  const float copy_ms = median_ms([&] {
    MOECOMM_CUDA_CHECK(
        cudaMemcpyAsync(big.get(), rows.get(), copy_bytes, cudaMemcpyDeviceToDevice));
  });
  const double copy_gbps = 2.0 * copy_bytes / (copy_ms * 1e6);
  std::printf("hbm_mix on %s: copy rate %.0f GB/s (read + written, %.0f MB copied)\n", prop.name,
              copy_gbps, copy_bytes / 1e6);
  std::printf("routed mixes: mean fan-out %.2f (top-%d of %d experts over %d ranks)\n",
              static_cast<double>(table.destinations) / kRows, kTopk, kExperts, kRanks);
  std::printf("%-22s %4s %7s %10s %8s %10s %9s\n", "mix", "fan", "blocks", "GB/s", "% copy",
              "GB/s/SM", "us");
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      fan_out_quantize_staged, cudaFuncAttributeMaxDynamicSharedMemorySize, kStagingBytes));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(
      fan_out_quantize_staged_routed, cudaFuncAttributeMaxDynamicSharedMemorySize, kStagingBytes));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(fan_out_quantize_staged_routed_pro<false>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kStagingBytes));
  MOECOMM_CUDA_CHECK(cudaFuncSetAttribute(fan_out_quantize_staged_routed_pro<true>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          kStagingBytes));
  const auto report = [&](const char* name, int fan, int blocks, double bytes, float ms) {
    const double gbps = bytes / (ms * 1e6);
    std::printf("%-22s %4d %7d %10.0f %7.1f%% %10.1f %9.1f\n", name, fan, blocks, gbps,
                100.0 * gbps / copy_gbps, gbps / blocks, ms * 1e3);
  };

  // LL combine's receive step, timed inside the kernel.
  epb::DeviceBuffer<unsigned long long> span(2);
  for (const int vectors : {1, 2}) {
    const char* name = vectors == 1 ? "fan-in-ll" : "fan-in-ll-2v";
    if (!wanted(name)) continue;
    for (int blocks : {64, 128}) {
      if (blocks > prop.multiProcessorCount) continue;
      const int64_t src_rows = big.bytes() / row_bytes;
      const float ms = median_span_ms(span.get(), [&] {
        if (vectors == 1)
          fan_in_pieces<1><<<blocks, kThreads>>>(big.get(), rows.get(), src_rows, span.get());
        else
          fan_in_pieces<2><<<blocks, kThreads>>>(big.get(), rows.get(), src_rows, span.get());
        MOECOMM_LAUNCH_CHECK("fan_in_pieces");
      });
      report(name, kTopk, blocks, double{kLlRows} * (kTopk + 1) * row_bytes, ms);
    }
  }

  // LL dispatch's send step, timed inside the kernel: the slots of the routed mixes' first
  // kLlRows rows (source r / kLlTokens, token r % kLlTokens), expert-major as LL lays them out.
  {
    constexpr int64_t kCapacity = kLlTokens;  // slots a (local expert, source)
    std::vector<int64_t> slot_table(int64_t{kLlRows} * kTopk);
    std::vector<int64_t> next(int64_t{kExperts} * kRanks, 0);  // [expert][source]
    for (int64_t r = 0; r < kLlRows; ++r) {
      const int s = static_cast<int>(r / kLlTokens);
      for (int k = 0; k < kTopk; ++k) {
        const int64_t e = table.experts[r * kTopk + k];
        // e = d * L + le: slot (d, le, s, position) = e * R * M + s * M + position.
        slot_table[r * kTopk + k] = (e * kRanks + s) * kCapacity + next[e * kRanks + s]++;
      }
    }
    if (int64_t{kExperts} * kRanks * kCapacity > out_rows)
      throw std::runtime_error("hbm_mix: the buffer holds fewer slots than fan-out-ll writes");
    epb::DeviceBuffer<int64_t> slots(slot_table.size());
    MOECOMM_CUDA_CHECK(
        cudaMemcpy(slots.get(), slot_table.data(), slots.bytes(), cudaMemcpyHostToDevice));
    struct LlMix {
      const char* name;
      void (*kernel)(const int4*, uint8_t*, float*, const int64_t*, int, unsigned long long*);
      bool quantize;
    };
    const LlMix ll_mixes[] = {
        {"fan-out-ll", fan_out_pieces<moecomm::device::kQuantizeUnroll, true>, true},
        {"fan-out-ll-u4", fan_out_pieces<4, true>, true},
        {"fan-out-ll-plain", fan_out_pieces<moecomm::device::kRowCopyUnroll, false>, false},
    };
    for (const LlMix& mix : ll_mixes) {
      for (int pieces : {1, 2, 4, 7}) {
        const std::string name = std::string(mix.name) + "-p" + std::to_string(pieces);
        if (!wanted(name.c_str())) continue;
        for (int blocks : {64, 128}) {
          if (blocks > prop.multiProcessorCount) continue;
          const float ms = median_span_ms(span.get(), [&] {
            mix.kernel<<<blocks, kThreads>>>(random_rows.get(), out, scales.get(), slots.get(),
                                             pieces, span.get());
            MOECOMM_LAUNCH_CHECK("fan_out_pieces");
          });
          const double written = mix.quantize ? out_bytes + 4.0 * kGroups : out_bytes;
          report(name.c_str(), kTopk, blocks, double{kLlRows} * (row_bytes + kTopk * written), ms);
        }
      }
    }
  }

  enum Mix { kFanOut, kQuant, kQuantStaged, kQuantInOrder, kQuantStagedInOrder, kFanIn };
  const char* names[] = {"fan-out", "quant", "quant-bulk", "quant-ord", "quant-bulk-ord", "fan-in"};
  for (const Mix mix :
       {kFanOut, kQuant, kQuantStaged, kQuantInOrder, kQuantStagedInOrder, kFanIn}) {
    if (!wanted(names[mix])) continue;
    for (int fan : {0, 1, 2, 4, 6}) {
      if (fan == 0 && (mix == kFanIn || mix == kFanOut)) continue;  // nothing would move
      for (int blocks : {32, 64, 128}) {
        if (blocks > prop.multiProcessorCount) continue;
        float ms = 0;
        double bytes = 0;
        if (mix == kFanOut) {
          ms = median_ms([&] {
            fan_out<<<blocks, kThreads>>>(rows.get(), big.get(), fan, out_rows);
            MOECOMM_LAUNCH_CHECK("fan_out");
          });
          bytes = kRows * (row_bytes + static_cast<double>(fan) * out_bytes);
        } else if (mix == kFanIn) {
          const int64_t src_rows = big.bytes() / row_bytes;
          ms = median_ms([&] {
            fan_in<<<blocks, kThreads>>>(big.get(), rows.get(), fan, src_rows);
            MOECOMM_LAUNCH_CHECK("fan_in");
          });
          bytes = kRows * (static_cast<double>(fan) * row_bytes + row_bytes);
        } else {
          const bool adjacent = mix == kQuantInOrder || mix == kQuantStagedInOrder;
          ms = median_ms([&] {
            if (mix == kQuant || mix == kQuantInOrder) {
              fan_out_quantize<<<blocks, kThreads>>>(rows.get(), out, scales.get(), fan, out_rows,
                                                     adjacent);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize");
            } else {
              fan_out_quantize_staged<<<blocks, kThreads, kStagingBytes>>>(
                  rows.get(), out, scales.get(), fan, out_rows, adjacent);
              MOECOMM_LAUNCH_CHECK("fan_out_quantize_staged");
            }
          });
          bytes = kRows * (row_bytes + static_cast<double>(fan) * (out_bytes + 4.0 * kGroups));
        }
        report(names[mix], fan, blocks, bytes, ms);
      }
    }
  }

  // The routed mixes (the header lists them), each a set of dispatch's features.
  struct RoutedMix {
    const char* name;
    bool staged = false, meta = false, pro = false, by_source = false;
    bool split = false, run_time = false, random = false;
  };
  constexpr bool Y = true, N = false;
  const RoutedMix routed_mixes[] = {
      // name, staged, meta, pro, by_source, split, run_time, random
      {"quant-rt", N, N, N, N, N, N, N},
      {"quant-bulk-rt", Y, N, N, N, N, N, N},
      {"quant-rt-meta", N, Y, N, N, N, N, N},
      {"quant-bulk-rt-meta", Y, Y, N, N, N, N, N},
      {"quant-rt-pro", N, Y, Y, N, N, N, N},
      {"quant-bulk-rt-pro", Y, Y, Y, N, N, N, N},
      {"quant-rt-src", N, Y, N, Y, N, N, N},
      {"quant-bulk-rt-src", Y, Y, N, Y, N, N, N},
      {"quant-bulk-rt-src-pro", Y, Y, Y, Y, N, N, N},
      {"quant-rt-src-pro", N, Y, Y, Y, N, N, N},
      {"quant-rt-src-pro-8k", N, Y, Y, Y, Y, N, N},
      {"quant-bulk-rt-src-pro-8k", Y, Y, Y, Y, Y, N, N},
      {"quant-rt-src-pro-8k-rts", N, Y, Y, Y, Y, Y, N},
      {"quant-bulk-rt-src-pro-8k-rts", Y, Y, Y, Y, Y, Y, N},
      {"quant-rt-src-pro-8k-rnd", N, Y, Y, Y, Y, N, Y},
      {"quant-bulk-rt-src-pro-8k-rnd", Y, Y, Y, Y, Y, N, Y},
  };
  for (const RoutedMix& mix : routed_mixes) {
    if (!wanted(mix.name)) continue;
    const Routes& rt = mix.by_source ? routes_src : routes;
    const Prologue& pl = mix.by_source ? prologue_src : prologue;
    const int4* src = (mix.random ? random_rows : rows).get();
    for (int blocks : {64, 128}) {
      if (blocks > prop.multiProcessorCount) continue;
      const float ms = median_ms([&] {
        if (mix.split) {
          MOECOMM_CUDA_CHECK(cudaMemsetAsync(counters.get(), 0, counters.bytes()));
          for (int source = 0; source < kRanks; ++source) {
            Prologue part = pl;
            part.counter = counters.get() + source;
            part.first_row = source;
            part.row_stride = kRanks;
            const auto kernel = mix.staged
                                    ? (mix.run_time ? fan_out_quantize_staged_routed_pro<true>
                                                    : fan_out_quantize_staged_routed_pro<false>)
                                    : (mix.run_time ? fan_out_quantize_routed_pro<true>
                                                    : fan_out_quantize_routed_pro<false>);
            kernel<<<blocks / kRanks, kThreads, mix.staged ? kStagingBytes : 0, streams[source]>>>(
                src, out, scales.get(), part, metadata);
            MOECOMM_LAUNCH_CHECK("hbm_mix: a source's kernel");
          }
        } else if (mix.pro) {
          MOECOMM_CUDA_CHECK(cudaMemsetAsync(counter.get(), 0, counter.bytes()));
          const auto kernel = mix.staged ? fan_out_quantize_staged_routed_pro<false>
                                         : fan_out_quantize_routed_pro<false>;
          kernel<<<blocks, kThreads, mix.staged ? kStagingBytes : 0>>>(src, out, scales.get(), pl,
                                                                       metadata);
          MOECOMM_LAUNCH_CHECK("hbm_mix: a prologue mix's kernel");
        } else {
          const auto kernel = mix.staged ? fan_out_quantize_staged_routed : fan_out_quantize_routed;
          kernel<<<blocks, kThreads, mix.staged ? kStagingBytes : 0>>>(src, out, scales.get(), rt,
                                                                       metadata, mix.meta);
          MOECOMM_LAUNCH_CHECK("hbm_mix: a routed mix's kernel");
        }
      });
      // Metadata a destination: kTopk int64 ids, kTopk float weights, an int32 source row.
      const double meta_bytes = mix.meta ? kTopk * (8.0 + 4.0) + 4.0 : 0.0;
      // The prologue's loads a row: the int32 record, kTopk int64 ids and float weights.
      const double prologue_bytes = mix.pro ? kRanks * 4.0 + kTopk * (8.0 + 4.0) : 0.0;
      const double bytes =
          kRows * (static_cast<double>(row_bytes) + prologue_bytes) +
          static_cast<double>(table.destinations) * (out_bytes + 4.0 * kGroups + meta_bytes);
      report(mix.name, 0, blocks, bytes, ms);
    }
  }
  for (cudaStream_t st : streams) MOECOMM_CUDA_CHECK(cudaStreamDestroy(st));
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "hbm_mix: %s\n", e.what());
  return 1;
}
