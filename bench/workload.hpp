// One benchmark problem: every rank's inputs on the host and the device, the host reference's
// outputs (the correctness gate compares against them), and the traffic the figures are based on.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "bench_common.hpp"
#include "moecomm/config.hpp"
#include "moecomm/tensor.hpp"
#include "options.hpp"
#include "reference/reference.hpp"

namespace epb {

inline constexpr int kScaleGroup = 128;  // channels per fp8 scale

/// The shape of one benchmark point.
struct Shape {
  moecomm::Mode mode = moecomm::Mode::kHighThroughput;  ///< kHighThroughput or kLowLatency
  int ranks = 0;
  int nodes = 1;   ///< virtual nodes (ranks r*G .. r*G+G-1 form node r, G = ranks / nodes)
  int tokens = 0;  ///< T per rank; also the LL capacity M
  int hidden = 0;
  int topk = 0;
  int experts = 0;
  bool fp8 = true;
  moecomm::ScaleFormat scale_format = moecomm::ScaleFormat::kFloat32;
  int expert_alignment = 1;

  bool ht() const { return mode == moecomm::Mode::kHighThroughput; }
  int local_experts() const { return experts / ranks; }
  int node_size() const { return ranks / nodes; }
  int node_of_rank(int rank) const { return rank / node_size(); }
  int node_of_expert(int64_t expert) const {
    return node_of_rank(static_cast<int>(expert / local_experts()));
  }
  int scale_groups() const { return fp8 ? hidden / kScaleGroup : 0; }
  /// Bytes of one dispatched row's data (fp8 or bf16), without scales.
  int64_t data_row_bytes() const { return fp8 ? hidden : 2 * int64_t{hidden}; }
  /// Bytes of one dispatched row with its scales.
  int64_t wire_row_bytes() const { return data_row_bytes() + 4 * int64_t{scale_groups()}; }
  int64_t bf16_row_bytes() const { return 2 * int64_t{hidden}; }
  moecomm::ref::Shape ref_shape() const { return {ranks, experts, topk, hidden}; }
};

/// One rank's inputs.
struct RankData {
  moecomm::ref::Routing routing;
  std::vector<float> weights;      ///< [T*K]
  moecomm::ref::Payload payload;   ///< the dispatched form (bf16, or fp8 + scales): ref input
  DeviceBuffer<uint16_t> x;        ///< [T, H] bf16
  DeviceBuffer<int64_t> topk_idx;  ///< [T, K]
  DeviceBuffer<float> topk_weights;
  DeviceBuffer<uint16_t> y;      ///< combine input: HT [N, H] (received order); LL [L, R*M, H]
  int64_t num_recv = 0;          ///< HT: rows this rank receives (N)
  int64_t valid_selections = 0;  ///< (token, expert) pairs with an expert (LL messages sent)
  // Virtual nodes (all 0 when nodes = 1):
  int64_t node_pairs = 0;         ///< HT: (token, destination node) pairs, its own node included
  int64_t remote_node_pairs = 0;  ///< HT: (token, destination node) pairs, other nodes only
  int64_t remote_selections = 0;  ///< LL: (token, expert) pairs whose expert is on another node
};

/// The host reference's outputs.
struct Expected {
  std::vector<moecomm::ref::HtReceived> ht;  ///< HT dispatch, per rank
  std::vector<moecomm::ref::LlReceived> ll;  ///< LL dispatch, per rank
  std::vector<std::vector<uint16_t>> out;    ///< combine out [T*H] bf16, per rank
  /// HT with nodes > 1: the one-level sum (ascending rank, one rounding) that the naive
  /// pipeline computes, per rank; empty when it equals `out`.
  std::vector<std::vector<uint16_t>> flat_out;
};

class NaivePipeline;

/// Bytes that define the figures (see docs/bench.md).
struct Traffic {
  double convention_bytes_per_rank = 0;  ///< DeepEP (HT) / NCCL EP (LL) bandwidth numerator
  double hbm_bytes = 0;  ///< source rows read once + destination rows written once, all ranks
  // Virtual nodes (nodes > 1; see docs/bench.md, "Groups that span nodes"), means over ranks:
  double rdma_bytes_per_rank = 0;    ///< bytes that cross the NIC (other nodes only)
  double nvlink_bytes_per_rank = 0;  ///< bytes delivered to ranks within a node
  /// HT: DeepEP's RDMA numerator, (token, node) pairs with the own node counted too.
  double deepep_rdma_bytes_per_rank = 0;
};

/// The traffic of two ops in a row (dispatch then combine).
Traffic sum(const Traffic& a, const Traffic& b);

struct Workload {
  Shape shape;
  int device = 0;
  std::vector<RankData> ranks;
  Expected expected;
  std::unique_ptr<NaivePipeline> naive;

  Workload();
  ~Workload();
  Workload(Workload&&) noexcept;
  Workload& operator=(Workload&&) noexcept;

  moecomm::TensorView x_view(int rank) const;
  moecomm::TensorView idx_view(int rank) const;
  moecomm::TensorView weights_view(int rank) const;
  moecomm::TensorView y_view(int rank) const;

  Traffic dispatch_traffic() const;
  Traffic combine_traffic() const;
};

/// Generates the inputs (seeded), runs the host reference and (with_naive) prepares the naive
/// pipeline. Every rank's inputs are built: a process of the process mode uses its own.
Workload build_workload(const Shape& shape, const Options& options, bool with_naive = true);

}  // namespace epb
