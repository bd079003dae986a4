#include "internode/regions.hpp"

#include <algorithm>

namespace moecomm::internode {

namespace {
size_t round16(size_t n) {
  return (n + 15) / 16 * 16;
}
}  // namespace

Regions claim_regions(const Config& config, const detail::RegionShape& shape, detail::Arena& window,
                      detail::Arena& local) {
  Regions r{};
  if (shape.num_nodes <= 1) return r;
  // The count exchange serves get_layout in every mode; the rows only HT.
  const size_t rows = config.mode == Mode::kLowLatency ? 0 : static_cast<size_t>(shape.max_tokens);
  const size_t R = static_cast<size_t>(shape.num_ranks), N = static_cast<size_t>(shape.num_nodes);
  const size_t G = static_cast<size_t>(shape.node_size),
               L = static_cast<size_t>(shape.local_experts);
  const size_t H = static_cast<size_t>(shape.hidden), K = static_cast<size_t>(shape.topk);
  const size_t W = static_cast<size_t>(shape.words), Tmax = static_cast<size_t>(shape.max_tokens);
  r.num_nodes = shape.num_nodes;
  r.node_size = shape.node_size;
  r.chunks = static_cast<int32_t>((Tmax + kChunkTokens - 1) / kChunkTokens);
  r.count_words = static_cast<int32_t>((R + N + L + 3) / 4 * 4);
  // A message: the row as received (bf16 2H bytes at most; fp8 H bytes then H/128 f32 scales),
  // then K i32 expert ids, K f32 weights, the source token and the row at each rank of the node.
  const size_t row = config.enable_fp8 ? std::max(2 * H, H + H / detail::kFp8Group * 4) : 2 * H;
  r.msg_meta = static_cast<int64_t>(round16(row));
  r.msg_bytes = static_cast<int64_t>(round16(r.msg_meta + (2 * K + 1 + G) * 4));
  r.part_bytes = static_cast<int64_t>(round16(2 * H + K * 4));
  const size_t cw = static_cast<size_t>(r.count_words);
  r.count_stage = window.offset<int32_t>(R * cw);
  r.count_recv = window.offset<int32_t>(2 * R * cw);
  r.dispatch_send = window.offset<uint8_t>(N * rows * r.msg_bytes);
  r.dispatch_recv = window.offset<uint8_t>(N * rows * r.msg_bytes);
  r.combine_send = window.offset<uint8_t>(N * rows * r.part_bytes);
  r.combine_recv = window.offset<uint8_t>(N * rows * r.part_bytes);
  r.sig_counts = window.offset<uint64_t>(R, /*zeroed=*/true);
  r.sig_arrive = window.offset<uint64_t>(R, /*zeroed=*/true);
  r.sig_dispatch = window.offset<uint64_t>(N * r.chunks, /*zeroed=*/true);
  r.sig_combine = window.offset<uint64_t>(N * r.chunks, /*zeroed=*/true);
  r.node_bitmap = local.take<uint32_t>(N * W);
  r.node_word_prefix = local.take<int32_t>(N * W);
  r.num_tokens_per_node = local.take<int32_t>(N);
  r.fresh_dispatches = local.take<uint64_t>(1);
  return r;
}

}  // namespace moecomm::internode
