// The pipeline a user would write without moecomm, timed beside it in the same run:
//   dispatch = permute (gather each rank's rows grouped by destination into a send buffer)
//              -> one cudaMemcpyAsync per (source, destination) into the receiver's buffer;
//   combine  = one cudaMemcpyAsync per pair back -> unpermute (sum each token's returned rows in
//              f32, weighted for LL, -> bf16).
// Its layouts are computed on the host ahead of time and its kernels use the whole GPU: both
// favour it. HT rows are deduplicated per rank (as moecomm's); LL rows are one per (token,
// expert), grouped by source rank on the receiver (moecomm's expert-major slots are not built).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "bench_common.hpp"

namespace epb {

struct Shape;
struct RankData;
struct Expected;

/// Host-side layout of one source rank's naive pipeline.
struct NaiveLayout {
  std::vector<int32_t> send_token;    ///< source token of each send row (grouped by destination)
  std::vector<int64_t> send_offset;   ///< [R + 1] first send row of each destination
  std::vector<int32_t> token_offset;  ///< [T + 1] combine: entries of each token
  std::vector<int32_t> token_row;     ///< combine: send row of each entry (reference order)
  std::vector<float> token_weight;    ///< combine (LL): weight of each entry
};

/// HT: one send row per (token, destination rank), ascending token; combine sums a token's rows
/// in ascending rank. LL: one per (token, expert), by local expert then token; combine applies
/// the weights in k order.
NaiveLayout make_naive_layout(const Shape& shape, const RankData& rank);

/// LL: the slots of receiver r's y [L, R*M, H] in the naive received-row order (by source, then
/// local expert, then token).
std::vector<int32_t> naive_ll_slots(const Shape& shape, const std::vector<RankData>& ranks, int r);

class NaivePipeline {
 public:
  NaivePipeline(const Shape& shape, const std::vector<RankData>& ranks, int device);

  /// Issues source rank s's dispatch on `stream`: permute, then a copy to every destination.
  /// remote = false (virtual nodes): only the copies to ranks on s's own node.
  void dispatch(int s, cudaStream_t stream, bool remote = true) const;
  /// Issues rank s's combine on `stream`: a copy back from every destination, then unpermute.
  /// remote = false: only the copies back from ranks on s's own node.
  void combine(int s, cudaStream_t stream, bool remote = true) const;
  /// After one dispatch and one combine (remote = true): checks the received rows against the
  /// inputs and the combined outputs against the reference (its one-level sum). Throws
  /// VerificationError.
  void verify(const Shape& shape, const std::vector<RankData>& ranks,
              const Expected& expected) const;

  /// Virtual nodes: rows rank r sends in dispatch to ranks on other nodes (it gets as many back
  /// in combine), and rows it receives from them (it sends as many back in combine).
  int64_t remote_rows_sent(int r) const;
  int64_t remote_rows_received(int r) const;

 private:
  struct Rank {
    NaiveLayout layout;
    std::vector<int64_t> recv_offset;    ///< [R + 1] first received row from each source
    DeviceBuffer<uint8_t> packed_input;  ///< fp8: data + scales per row (bf16 uses x itself)
    const void* input = nullptr;         ///< [T, wire stride]
    DeviceBuffer<int32_t> send_token;
    DeviceBuffer<uint8_t> send, recv;  ///< [rows, wire stride]
    DeviceBuffer<uint16_t> own_y;      ///< LL: expert outputs in received-row order
    const uint16_t* y = nullptr;       ///< [recv rows, H] bf16 (HT: the workload's y)
    DeviceBuffer<uint16_t> back;       ///< [send rows, H] bf16
    DeviceBuffer<uint16_t> out;        ///< [T, H] bf16
    DeviceBuffer<int32_t> token_offset, token_row;
    DeviceBuffer<float> token_weight;
  };

  void prepare_input(const Shape& shape, const RankData& data, Rank& rank) const;
  void prepare_ll_outputs(const Shape& shape, const std::vector<RankData>& ranks);

  bool same_node(int a, int b) const { return a / node_size_ == b / node_size_; }

  int num_ranks_ = 0;
  int node_size_ = 0;  ///< ranks per virtual node
  int hidden_ = 0;
  int64_t wire_stride_ = 0;  ///< bytes between rows in send/recv buffers (16-byte multiple)
  std::vector<Rank> ranks_;
};

}  // namespace epb
