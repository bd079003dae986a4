#include "workload.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "common/random.hpp"
#include "naive.hpp"
#include "routing.hpp"

namespace epb {

using moecomm::DType;
using moecomm::TensorView;
namespace ref = moecomm::ref;

namespace {

// Keys that separate the generated streams of values.
enum class Stream : uint64_t { kHtRouting = 1, kLlRouting, kX, kY };

uint64_t stream_key(uint64_t seed, Stream stream, int rank) {
  return mix64(mix64(seed) ^ (static_cast<uint64_t>(stream) << 32) ^ static_cast<uint64_t>(rank));
}

/// The dispatched form of one rank's bf16 rows: themselves, or fp8 + scales (the reference's
/// quantisation, bit-exact with the kernels').
ref::Payload make_payload(const Shape& shape, const std::vector<uint16_t>& x,
                          const std::vector<float>& weights) {
  const int64_t T = static_cast<int64_t>(x.size()) / shape.hidden;
  ref::Payload p;
  p.row_bytes = static_cast<int>(shape.data_row_bytes());
  p.x.resize(static_cast<size_t>(T * p.row_bytes));
  if (shape.fp8) {
    p.x_scales.resize(static_cast<size_t>(T) * shape.scale_groups());
    ref::quantize_fp8(x.data(), T, shape.hidden, shape.scale_format, p.x.data(), p.x_scales.data());
  } else {
    std::memcpy(p.x.data(), x.data(), p.x.size());
  }
  p.topk_weights = weights;
  return p;
}

/// Virtual nodes: the (token, node) pairs of rank r's routing (HT: a token crosses to each other
/// node once) and its selections of experts on other nodes (LL: one message each).
void count_node_traffic(const Shape& sh, int r, RankData& d) {
  const int K = sh.topk, own = sh.node_of_rank(r);
  std::vector<int64_t> seen(sh.nodes, -1);  // last token that reached each node
  for (int64_t t = 0; t < d.routing.num_tokens; ++t)
    for (int k = 0; k < K; ++k) {
      const int64_t e = d.routing.topk_idx[t * K + k];
      if (e < 0) continue;
      const int n = sh.node_of_expert(e);
      if (n != own) ++d.remote_selections;
      if (seen[n] == t) continue;
      seen[n] = t;
      ++d.node_pairs;
      if (n != own) ++d.remote_node_pairs;
    }
}

/// Routing, weights, x and its dispatched form for every rank; uploads what the device needs.
void make_inputs(Workload& wl, const Options& o) {
  const Shape& sh = wl.shape;
  const int R = sh.ranks, K = sh.topk;
  const int64_t T = sh.tokens;
  std::mt19937_64 rng(stream_key(o.seed, sh.ht() ? Stream::kHtRouting : Stream::kLlRouting, 0));
  const Router router({o.routing, sh.experts, K, R, o.zipf_s, o.topk_groups}, rng);
  wl.ranks.resize(R);
  for (RankData& d : wl.ranks) {
    d.routing.num_tokens = T;
    d.routing.topk_idx = router.route(rng, T);
    d.weights = moecomm::test::random_f32(rng, static_cast<size_t>(T) * K);
    d.valid_selections = std::count_if(d.routing.topk_idx.begin(), d.routing.topk_idx.end(),
                                       [](int64_t e) { return e >= 0; });
  }
  if (sh.nodes > 1)
    for (int r = 0; r < R; ++r) count_node_traffic(sh, r, wl.ranks[r]);
  std::vector<std::vector<uint16_t>> x(R,
                                       std::vector<uint16_t>(static_cast<size_t>(T) * sh.hidden));
  for (int r = 0; r < R; ++r) fill_hashed_bf16(x[r], stream_key(o.seed, Stream::kX, r));
  host_parallel_for(
      R, [&](int64_t r) { wl.ranks[r].payload = make_payload(sh, x[r], wl.ranks[r].weights); });
  for (int r = 0; r < R; ++r) {
    RankData& d = wl.ranks[r];
    d.x = DeviceBuffer<uint16_t>(x[r]);
    d.topk_idx = DeviceBuffer<int64_t>(d.routing.topk_idx);
    d.topk_weights = DeviceBuffer<float>(d.weights);
  }
}

std::vector<ref::Routing> routings(const Workload& wl) {
  std::vector<ref::Routing> out;
  for (const RankData& d : wl.ranks) out.push_back(d.routing);
  return out;
}

/// HT: reference dispatch; y = N_r hashed rows per rank; reference combine.
void make_ht_expected(Workload& wl, const Options& o) {
  const Shape& sh = wl.shape;
  const auto routing = routings(wl);
  std::vector<ref::Payload> payloads;
  for (const RankData& d : wl.ranks) payloads.push_back(d.payload);
  wl.expected.ht = ref::ht_dispatch(sh.ref_shape(), routing, payloads, sh.expert_alignment);
  payloads.clear();

  std::vector<std::vector<uint16_t>> y(sh.ranks);
  for (int r = 0; r < sh.ranks; ++r) {
    RankData& d = wl.ranks[r];
    d.num_recv = wl.expected.ht[r].num_recv;
    y[r].resize(static_cast<size_t>(d.num_recv) * sh.hidden);
    fill_hashed_bf16(y[r], stream_key(o.seed, Stream::kY, r));
    d.y = DeviceBuffer<uint16_t>(y[r]);
  }
  // Spanning nodes, the internode path sums within each node first (one bf16 partial per
  // (token, node)); the naive pipeline sums every row at once.
  auto combined = ref::ht_combine(sh.ref_shape(), routing, y, {}, {}, sh.nodes);
  for (auto& c : combined) wl.expected.out.push_back(std::move(c.out));
  if (sh.nodes > 1) {
    auto flat = ref::ht_combine(sh.ref_shape(), routing, y, {}, {});
    for (auto& c : flat) wl.expected.flat_out.push_back(std::move(c.out));
  }
}

/// LL: reference dispatch; y = [L, R*M, H] per rank, hashed values in the valid slots (the only
/// ones combine reads) and zeros elsewhere; reference combine.
void make_ll_expected(Workload& wl, const Options& o) {
  const Shape& sh = wl.shape;
  const auto routing = routings(wl);
  std::vector<ref::Payload> payloads;
  for (const RankData& d : wl.ranks) payloads.push_back(d.payload);
  wl.expected.ll = ref::ll_dispatch(sh.ref_shape(), sh.tokens, routing, payloads);
  payloads.clear();

  const int64_t H = sh.hidden;
  std::vector<std::vector<uint16_t>> y(sh.ranks);
  std::vector<std::vector<float>> weights;
  for (int r = 0; r < sh.ranks; ++r) {
    const auto& valid = wl.expected.ll[r].slot_valid;
    const uint64_t key = stream_key(o.seed, Stream::kY, r);
    y[r].assign(valid.size() * H, 0);
    host_parallel_for(static_cast<int64_t>(valid.size()), [&](int64_t slot) {
      if (!valid[slot]) return;
      for (int64_t h = 0; h < H; ++h) y[r][slot * H + h] = hashed_bf16(key, slot * H + h);
    });
    wl.ranks[r].y = DeviceBuffer<uint16_t>(y[r]);
    weights.push_back(wl.ranks[r].weights);
  }
  wl.expected.out = ref::ll_combine(sh.ref_shape(), sh.tokens, routing, weights, y);
}

}  // namespace

Workload::Workload() = default;
Workload::~Workload() = default;
Workload::Workload(Workload&&) noexcept = default;
Workload& Workload::operator=(Workload&&) noexcept = default;

TensorView Workload::x_view(int r) const {
  return TensorView::contiguous(ranks[r].x.get(), DType::kBF16, {shape.tokens, shape.hidden},
                                device);
}

TensorView Workload::idx_view(int r) const {
  return TensorView::contiguous(ranks[r].topk_idx.get(), DType::kI64, {shape.tokens, shape.topk},
                                device);
}

TensorView Workload::weights_view(int r) const {
  return TensorView::contiguous(ranks[r].topk_weights.get(), DType::kF32,
                                {shape.tokens, shape.topk}, device);
}

TensorView Workload::y_view(int r) const {
  if (shape.ht())
    return TensorView::contiguous(ranks[r].y.get(), DType::kBF16, {ranks[r].num_recv, shape.hidden},
                                  device);
  const int64_t slots = int64_t{shape.ranks} * shape.tokens;
  return TensorView::contiguous(ranks[r].y.get(), DType::kBF16,
                                {shape.local_experts(), slots, shape.hidden}, device);
}

namespace {

struct Totals {
  double tokens = 0;      // sum of T over ranks
  double moved_rows = 0;  // HT: rows received; LL: (token, expert) messages
  // Virtual nodes: rows that cross the NIC (HT: (token, other node) pairs; LL: selections of
  // experts on other nodes), and HT's (token, node) pairs with the own node (DeepEP's count).
  double remote_rows = 0;
  double node_pairs = 0;
};

Totals totals(const Workload& wl) {
  Totals t;
  for (const RankData& d : wl.ranks) {
    t.tokens += static_cast<double>(d.routing.num_tokens);
    t.moved_rows += static_cast<double>(wl.shape.ht() ? d.num_recv : d.valid_selections);
    t.remote_rows += static_cast<double>(wl.shape.ht() ? d.remote_node_pairs : d.remote_selections);
    t.node_pairs += static_cast<double>(d.node_pairs);
  }
  return t;
}

/// The node figures of one direction; `row` is the bytes of one row as it travels.
void set_node_traffic(const Shape& shape, const Totals& t, double row, Traffic& tr) {
  if (shape.nodes <= 1) return;
  const double R = shape.ranks;
  tr.rdma_bytes_per_rank = t.remote_rows * row / R;
  // HT: every received row is delivered over NVLink (rows from other nodes forwarded by the
  // rank of the same local index); LL: the messages whose expert is on the sender's node.
  tr.nvlink_bytes_per_rank = (shape.ht() ? t.moved_rows : t.moved_rows - t.remote_rows) * row / R;
  tr.deepep_rdma_bytes_per_rank = shape.ht() ? t.node_pairs * row / R : 0.0;
}

}  // namespace

Traffic Workload::dispatch_traffic() const {
  const Totals t = totals(*this);
  const double R = shape.ranks, bf16_row = static_cast<double>(shape.bf16_row_bytes());
  const double wire = static_cast<double>(shape.wire_row_bytes());
  Traffic tr;
  // DeepEP (HT): bytes received per rank, scales included. NCCL EP (LL): valid selections x H x
  // bytes per element.
  tr.convention_bytes_per_rank =
      shape.ht() ? t.moved_rows * wire / R
                 : t.moved_rows * static_cast<double>(shape.data_row_bytes()) / R;
  tr.hbm_bytes = t.tokens * bf16_row + t.moved_rows * wire;  // bf16 x read, rows written
  set_node_traffic(shape, t, wire, tr);  // rows with their scales, as dispatched
  return tr;
}

Traffic Workload::combine_traffic() const {
  const Totals t = totals(*this);
  const double R = shape.ranks, bf16_row = static_cast<double>(shape.bf16_row_bytes());
  Traffic tr;
  tr.convention_bytes_per_rank = t.moved_rows * bf16_row / R;
  tr.hbm_bytes = t.moved_rows * bf16_row + t.tokens * bf16_row;  // y rows read, out written
  set_node_traffic(shape, t, bf16_row, tr);  // HT: one bf16 partial row per (token, node)
  return tr;
}

Traffic sum(const Traffic& a, const Traffic& b) {
  Traffic t;
  t.convention_bytes_per_rank = a.convention_bytes_per_rank + b.convention_bytes_per_rank;
  t.hbm_bytes = a.hbm_bytes + b.hbm_bytes;
  t.rdma_bytes_per_rank = a.rdma_bytes_per_rank + b.rdma_bytes_per_rank;
  t.nvlink_bytes_per_rank = a.nvlink_bytes_per_rank + b.nvlink_bytes_per_rank;
  t.deepep_rdma_bytes_per_rank = a.deepep_rdma_bytes_per_rank + b.deepep_rdma_bytes_per_rank;
  return t;
}

Workload build_workload(const Shape& shape, const Options& options, bool with_naive) {
  MOECOMM_CUDA_CHECK(cudaSetDevice(options.device));
  Workload wl;
  wl.shape = shape;
  wl.device = options.device;
  make_inputs(wl, options);
  if (shape.ht())
    make_ht_expected(wl, options);
  else
    make_ll_expected(wl, options);
  if (with_naive) wl.naive = std::make_unique<NaivePipeline>(shape, wl.ranks, options.device);
  return wl;
}

}  // namespace epb
