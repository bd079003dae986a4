#include "verify.hpp"

#include <string>

namespace epb {

using moecomm::DispatchOutput;
using moecomm::TensorView;

namespace {

constexpr uint8_t kPoison = 0xAB;  // no correct output is all 0xAB bytes

/// The first n elements of a contiguous device view.
template <typename T>
std::vector<T> fetch(const TensorView& v, size_t n, const std::string& what) {
  if (!v.present() || !v.is_contiguous() || v.nbytes() < n * sizeof(T))
    throw VerificationError(what + ": expected a contiguous view of at least " + std::to_string(n) +
                            " elements, got " + v.describe());
  return download<T>(v.data, n);
}

std::string where(const char* form, int rank) {
  return std::string(form) + ", rank " + std::to_string(rank) + ": ";
}

/// Rows of `all` (row_len elements each) whose slot is valid.
template <typename T>
std::vector<T> valid_rows(const std::vector<T>& all, const std::vector<uint8_t>& valid,
                          size_t row_len) {
  std::vector<T> out;
  for (size_t s = 0; s < valid.size(); ++s)
    if (valid[s]) out.insert(out.end(), all.begin() + s * row_len, all.begin() + (s + 1) * row_len);
  return out;
}

}  // namespace

void poison(const TensorView& v) {
  if (v.present() && v.data) MOECOMM_CUDA_CHECK(cudaMemset(v.data, kPoison, v.nbytes()));
  // The ranks' streams do not wait for the legacy stream: finish the poison first.
  MOECOMM_CUDA_CHECK(cudaDeviceSynchronize());
}

/// The output buffers of a dispatch; not the handle's metadata (a cached dispatch reads it).
void poison(const DispatchOutput& d) {
  for (const TensorView* v : {&d.recv_x, &d.recv_x_scales, &d.recv_topk_idx, &d.recv_topk_weights,
                              &d.recv_src_token, &d.recv_src_info, &d.recv_count, &d.recv_layout})
    poison(*v);
}

void check_ht_dispatch(const Workload& wl, int r, const DispatchOutput& d, const char* form) {
  const auto& want = wl.expected.ht[r];
  const Shape& sh = wl.shape;
  const std::string at = where(form, r);
  const size_t N = want.num_recv, K = sh.topk, G = sh.scale_groups();
  const int64_t n_device =
      fetch<int32_t>(d.num_recv_tokens_device, 1, at + "num_recv_tokens_device")[0];
  if (n_device != want.num_recv || (d.num_recv_tokens >= 0 && d.num_recv_tokens != want.num_recv))
    throw VerificationError(at + "received " + std::to_string(n_device) + " rows (host " +
                            std::to_string(d.num_recv_tokens) + "), want " +
                            std::to_string(want.num_recv));
  expect_equal(at + "recv_x", fetch<uint8_t>(d.recv_x, N * sh.data_row_bytes(), at + "recv_x"),
               want.x);
  if (G > 0)
    expect_equal(at + "recv_x_scales", fetch<float>(d.recv_x_scales, N * G, at + "recv_x_scales"),
                 want.x_scales);
  expect_equal(at + "recv_topk_idx", fetch<int64_t>(d.recv_topk_idx, N * K, at + "recv_topk_idx"),
               want.topk_idx);
  expect_equal(at + "recv_topk_weights",
               fetch<float>(d.recv_topk_weights, N * K, at + "recv_topk_weights"),
               want.topk_weights);
  expect_equal(at + "recv_src_token", fetch<int32_t>(d.recv_src_token, N, at + "recv_src_token"),
               want.src_token);
  expect_equal(at + "recv_rank_prefix",
               fetch<int32_t>(d.recv_rank_prefix, sh.ranks + 1, at + "recv_rank_prefix"),
               want.rank_prefix);
  const size_t L = sh.local_experts();
  expect_equal(at + "num_recv_tokens_per_expert",
               fetch<int32_t>(d.num_recv_tokens_per_expert, L, at + "num_recv_tokens_per_expert"),
               want.num_recv_tokens_per_expert);
  if (d.num_recv_tokens >= 0)
    expect_equal(at + "num_recv_tokens_per_expert_host", d.num_recv_tokens_per_expert_host,
                 std::vector<int>(want.num_recv_tokens_per_expert.begin(),
                                  want.num_recv_tokens_per_expert.end()));
}

void check_ll_dispatch(const Workload& wl, int r, const DispatchOutput& d, const char* form) {
  const auto& want = wl.expected.ll[r];
  const Shape& sh = wl.shape;
  const std::string at = where(form, r);
  const size_t L = sh.local_experts(), R = sh.ranks, G = sh.scale_groups();
  const size_t slots = L * R * sh.tokens, rb = sh.data_row_bytes();
  expect_equal(at + "recv_count", fetch<int32_t>(d.recv_count, L, at + "recv_count"), want.count);
  expect_equal(at + "recv_layout", fetch<int32_t>(d.recv_layout, L * R * 2, at + "recv_layout"),
               want.layout);
  const auto& valid = want.slot_valid;
  expect_equal(at + "recv_x (valid slots)",
               valid_rows(fetch<uint8_t>(d.recv_x, slots * rb, at + "recv_x"), valid, rb),
               valid_rows(want.x, valid, rb));
  if (G > 0)
    expect_equal(
        at + "recv_x_scales (valid slots)",
        valid_rows(fetch<float>(d.recv_x_scales, slots * G, at + "recv_x_scales"), valid, G),
        valid_rows(want.x_scales, valid, G));
  expect_equal(at + "recv_src_info (valid slots)",
               valid_rows(fetch<int32_t>(d.recv_src_info, slots, at + "recv_src_info"), valid, 1),
               valid_rows(want.src_token, valid, 1));
}

void check_combine(const Workload& wl, int r, const TensorView& out, const char* form) {
  const std::string at = where(form, r);
  const size_t n = static_cast<size_t>(wl.shape.tokens) * wl.shape.hidden;
  expect_equal(at + "combine out", fetch<uint16_t>(out, n, at + "out"), wl.expected.out[r]);
}

}  // namespace epb
