#include "naive.hpp"

#include <cstring>
#include <string>

#include "kernels.hpp"
#include "workload.hpp"

namespace epb {
namespace {

constexpr int64_t kRowAlignment = 16;  // the permute kernel copies 16-byte vectors

/// Rows each destination gets from one source: HT one per token that reaches it (ascending
/// token), LL one per (token, expert) grouped by local expert, then ascending token.
std::vector<std::vector<int32_t>> rows_per_destination(const Shape& shape,
                                                       const moecomm::ref::Routing& routing) {
  const int R = shape.ranks, L = shape.local_experts(), K = shape.topk;
  std::vector<std::vector<int32_t>> per_dest(R);
  std::vector<std::vector<int32_t>> per_expert(shape.experts);
  for (int64_t t = 0; t < routing.num_tokens; ++t) {
    std::vector<bool> hit(R, false);
    for (int k = 0; k < K; ++k) {
      const int64_t e = routing.topk_idx[t * K + k];
      if (e < 0) continue;
      hit[e / L] = true;
      per_expert[e].push_back(static_cast<int32_t>(t));
    }
    for (int r = 0; r < R && shape.ht(); ++r)
      if (hit[r]) per_dest[r].push_back(static_cast<int32_t>(t));
  }
  if (!shape.ht())
    for (int e = 0; e < shape.experts; ++e)
      per_dest[e / L].insert(per_dest[e / L].end(), per_expert[e].begin(), per_expert[e].end());
  return per_dest;
}

/// Tokens of one rank that selected each expert.
std::vector<int64_t> expert_counts(const Shape& shape, const moecomm::ref::Routing& routing) {
  std::vector<int64_t> count(shape.experts, 0);
  for (int64_t e : routing.topk_idx)
    if (e >= 0) ++count[e];
  return count;
}

}  // namespace

NaiveLayout make_naive_layout(const Shape& shape, const RankData& rank) {
  const int R = shape.ranks, L = shape.local_experts(), K = shape.topk;
  const auto& idx = rank.routing.topk_idx;
  const int64_t T = rank.routing.num_tokens;
  NaiveLayout lay;
  const auto per_dest = rows_per_destination(shape, rank.routing);
  lay.send_offset.assign(R + 1, 0);
  for (int r = 0; r < R; ++r) {
    lay.send_token.insert(lay.send_token.end(), per_dest[r].begin(), per_dest[r].end());
    lay.send_offset[r + 1] = lay.send_offset[r] + static_cast<int64_t>(per_dest[r].size());
  }

  // Combine entries: where each token's returned rows lie in the send-ordered buffer.
  lay.token_offset.assign(T + 1, 0);
  if (shape.ht()) {
    std::vector<int64_t> cursor(lay.send_offset.begin(), lay.send_offset.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<bool> hit(R, false);
      for (int k = 0; k < K; ++k)
        if (idx[t * K + k] >= 0) hit[idx[t * K + k] / L] = true;
      for (int r = 0; r < R; ++r)  // ascending rank: the reference's summation order
        if (hit[r]) lay.token_row.push_back(static_cast<int32_t>(cursor[r]++));
      lay.token_offset[t + 1] = static_cast<int32_t>(lay.token_row.size());
    }
  } else {
    const std::vector<int64_t> count = expert_counts(shape, rank.routing);
    std::vector<int64_t> cursor(shape.experts);
    for (int e = 0; e < shape.experts; ++e)
      cursor[e] = e % L == 0 ? lay.send_offset[e / L] : cursor[e - 1] + count[e - 1];
    for (int64_t t = 0; t < T; ++t) {
      for (int k = 0; k < K; ++k) {  // k order: the reference's fmaf order
        const int64_t e = idx[t * K + k];
        if (e < 0) continue;
        lay.token_row.push_back(static_cast<int32_t>(cursor[e]++));
        lay.token_weight.push_back(rank.weights[t * K + k]);
      }
      lay.token_offset[t + 1] = static_cast<int32_t>(lay.token_row.size());
    }
  }
  return lay;
}

void NaivePipeline::prepare_input(const Shape& shape, const RankData& data, Rank& rank) const {
  if (!shape.fp8) {  // bf16 rows are x itself (2H bytes, a multiple of 16)
    rank.input = data.x.get();
    return;
  }
  // fp8: the user quantises first (not timed) and moves data + scales as one packed row.
  const int64_t T = data.routing.num_tokens, H = shape.hidden, G = shape.scale_groups();
  std::vector<uint8_t> packed(static_cast<size_t>(T * wire_stride_), 0);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(&packed[t * wire_stride_], &data.payload.x[t * H], H);
    std::memcpy(&packed[t * wire_stride_ + H], &data.payload.x_scales[t * G], G * sizeof(float));
  }
  rank.packed_input = DeviceBuffer<uint8_t>(packed);
  rank.input = rank.packed_input.get();
}

std::vector<int32_t> naive_ll_slots(const Shape& shape, const std::vector<RankData>& ranks, int r) {
  const int R = shape.ranks, L = shape.local_experts();
  const int64_t M = shape.tokens;
  std::vector<int32_t> slots;
  for (int s = 0; s < R; ++s) {
    const std::vector<int64_t> count = expert_counts(shape, ranks[s].routing);
    for (int le = 0; le < L; ++le)
      for (int64_t j = 0; j < count[r * L + le]; ++j)
        slots.push_back(static_cast<int32_t>(le * R * M + s * M + j));
  }
  return slots;
}

void NaivePipeline::prepare_ll_outputs(const Shape& shape, const std::vector<RankData>& ranks) {
  // The experts' outputs (the workload's LL y, in moecomm's slots) gathered into received-row
  // order, so that both pipelines combine the same values.
  for (int r = 0; r < shape.ranks; ++r) {
    const std::vector<int32_t> slots = naive_ll_slots(shape, ranks, r);
    Rank& rank = ranks_[r];
    rank.own_y = DeviceBuffer<uint16_t>(slots.size() * shape.hidden);
    const DeviceBuffer<int32_t> d_slots(slots);
    launch_permute(ranks[r].y.get(), d_slots.get(), static_cast<int64_t>(slots.size()),
                   shape.bf16_row_bytes(), rank.own_y.get(), nullptr);
    MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
    rank.y = rank.own_y.get();
  }
}

NaivePipeline::NaivePipeline(const Shape& shape, const std::vector<RankData>& ranks, int device)
    : num_ranks_(shape.ranks),
      node_size_(shape.node_size()),
      hidden_(shape.hidden),
      wire_stride_(round_up(shape.wire_row_bytes(), kRowAlignment)) {
  MOECOMM_CUDA_CHECK(cudaSetDevice(device));
  const int R = num_ranks_;
  ranks_.resize(R);
  for (int s = 0; s < R; ++s) ranks_[s].layout = make_naive_layout(shape, ranks[s]);
  for (int r = 0; r < R; ++r) {
    auto& recv_offset = ranks_[r].recv_offset;
    recv_offset.assign(R + 1, 0);
    for (int s = 0; s < R; ++s) {
      const auto& so = ranks_[s].layout.send_offset;
      recv_offset[s + 1] = recv_offset[s] + (so[r + 1] - so[r]);
    }
  }
  for (int s = 0; s < R; ++s) {
    Rank& rank = ranks_[s];
    const NaiveLayout& lay = rank.layout;
    const int64_t sent = lay.send_offset[R], received = rank.recv_offset[R];
    prepare_input(shape, ranks[s], rank);
    rank.send_token = DeviceBuffer<int32_t>(lay.send_token);
    rank.send = DeviceBuffer<uint8_t>(sent * wire_stride_);
    rank.recv = DeviceBuffer<uint8_t>(received * wire_stride_);
    rank.back = DeviceBuffer<uint16_t>(sent * shape.hidden);
    rank.out = DeviceBuffer<uint16_t>(ranks[s].routing.num_tokens * shape.hidden);
    rank.token_offset = DeviceBuffer<int32_t>(lay.token_offset);
    rank.token_row = DeviceBuffer<int32_t>(lay.token_row);
    rank.token_weight = DeviceBuffer<float>(lay.token_weight);
    rank.y = ranks[s].y.get();
  }
  if (!shape.ht()) prepare_ll_outputs(shape, ranks);
}

void NaivePipeline::dispatch(int s, cudaStream_t stream, bool remote) const {
  const Rank& me = ranks_[s];
  const auto& so = me.layout.send_offset;
  launch_permute(me.input, me.send_token.get(), so[num_ranks_], wire_stride_, me.send.get(),
                 stream);
  for (int r = 0; r < num_ranks_; ++r) {
    const int64_t rows = so[r + 1] - so[r];
    if (rows == 0 || (!remote && !same_node(s, r))) continue;
    uint8_t* to = ranks_[r].recv.get() + ranks_[r].recv_offset[s] * wire_stride_;
    MOECOMM_CUDA_CHECK(cudaMemcpyAsync(to, me.send.get() + so[r] * wire_stride_,
                                       rows * wire_stride_, cudaMemcpyDeviceToDevice, stream));
  }
}

void NaivePipeline::combine(int s, cudaStream_t stream, bool remote) const {
  const Rank& me = ranks_[s];
  const auto& so = me.layout.send_offset;
  const int64_t H = hidden_;
  for (int r = 0; r < num_ranks_; ++r) {
    const int64_t rows = so[r + 1] - so[r];
    if (rows == 0 || (!remote && !same_node(s, r))) continue;
    const uint16_t* from = ranks_[r].y + ranks_[r].recv_offset[s] * H;
    MOECOMM_CUDA_CHECK(cudaMemcpyAsync(me.back.get() + so[r] * H, from, rows * H * sizeof(uint16_t),
                                       cudaMemcpyDeviceToDevice, stream));
  }
  const int64_t T = static_cast<int64_t>(me.layout.token_offset.size()) - 1;
  const float* weights = me.layout.token_weight.empty() ? nullptr : me.token_weight.get();
  launch_unpermute(me.back.get(), me.token_offset.get(), me.token_row.get(), weights, T, hidden_,
                   me.out.get(), stream);
}

void NaivePipeline::verify(const Shape& shape, const std::vector<RankData>& ranks,
                           const Expected& expected) const {
  const int R = num_ranks_;
  const int64_t rb = shape.data_row_bytes(), G = shape.scale_groups();
  for (int r = 0; r < R; ++r) {
    const Rank& me = ranks_[r];
    const auto recv = download<uint8_t>(me.recv.get(), me.recv.size());
    for (int s = 0; s < R; ++s) {
      const NaiveLayout& src = ranks_[s].layout;
      for (int64_t j = 0; j < me.recv_offset[s + 1] - me.recv_offset[s]; ++j) {
        const int64_t t = src.send_token[src.send_offset[r] + j];
        const uint8_t* row = &recv[(me.recv_offset[s] + j) * wire_stride_];
        const std::string where = "naive pipeline: rank " + std::to_string(r) + ", row " +
                                  std::to_string(me.recv_offset[s] + j) + " from rank " +
                                  std::to_string(s);
        expect_equal(where + " (data)", row, &ranks[s].payload.x[t * rb], rb);
        if (G > 0) {
          std::vector<float> scales(G);
          std::memcpy(scales.data(), row + rb, G * sizeof(float));
          expect_equal(where + " (scales)", scales.data(), &ranks[s].payload.x_scales[t * G], G);
        }
      }
    }
    const auto out = download<uint16_t>(me.out.get(), me.out.size());
    const auto& want = expected.flat_out.empty() ? expected.out[r] : expected.flat_out[r];
    expect_equal("naive pipeline: combined out of rank " + std::to_string(r), out, want);
  }
}

int64_t NaivePipeline::remote_rows_sent(int r) const {
  const auto& so = ranks_[r].layout.send_offset;
  int64_t rows = 0;
  for (int q = 0; q < num_ranks_; ++q)
    if (!same_node(r, q)) rows += so[q + 1] - so[q];
  return rows;
}

int64_t NaivePipeline::remote_rows_received(int r) const {
  const auto& ro = ranks_[r].recv_offset;
  int64_t rows = 0;
  for (int q = 0; q < num_ranks_; ++q)
    if (!same_node(r, q)) rows += ro[q + 1] - ro[q];
  return rows;
}

}  // namespace epb
