#include "ll/regions.hpp"

#include "moecomm/config.hpp"
#include "runtime/arena.hpp"

namespace moecomm::ll {

Regions claim_regions(const Config& config, const detail::RegionShape& shape,
                      detail::Arena& symmetric, detail::Arena& local) {
  const size_t R = static_cast<size_t>(shape.num_ranks);
  const size_t L = static_cast<size_t>(shape.local_experts);
  const size_t H = static_cast<size_t>(shape.hidden);
  const size_t groups = H / detail::kFp8Group;
  Regions r{};
  r.capacity = config.mode != Mode::kHighThroughput ? config.ll_capacity() : 0;
  r.count_sig = symmetric.offset<uint64_t>(2 * L * R, /*zeroed=*/true);
  r.peer_ptrs = symmetric.offset<uint64_t>(2 * R * detail::kPeerPtrs, /*zeroed=*/true);
  const size_t slots = L * R * static_cast<size_t>(r.capacity);
  for (int b = 0; b < 2; ++b) {
    r.x[b] = symmetric.offset<uint16_t>(slots * H);
    r.scales[b] = symmetric.offset<float>(config.enable_fp8 ? slots * groups : 0);
    r.src_token[b] = symmetric.offset<int32_t>(slots);
    r.combine[b] = symmetric.offset<uint16_t>(slots * H);
  }
  if (shape.num_nodes > 1 && r.capacity > 0) {
    const size_t M = static_cast<size_t>(r.capacity);
    const size_t remote = R - static_cast<size_t>(shape.node_size);
    r.meta_words = 1 + (config.enable_fp8 ? static_cast<int32_t>(groups) : 0);
    r.stage = symmetric.offset<uint16_t>(M * 2 * H);
    for (int b = 0; b < 2; ++b) {
      r.meta[b] = symmetric.offset<uint64_t>(slots * r.meta_words);
      r.combine_recv[b] = symmetric.offset<uint16_t>(remote * L * M * H);
    }
    r.sig_arrive = symmetric.offset<uint64_t>(R, /*zeroed=*/true);
    r.sig_counts = symmetric.offset<uint64_t>(2 * R, /*zeroed=*/true);
    r.sig_combine = symmetric.offset<uint64_t>(2 * R, /*zeroed=*/true);
    r.sig_done = symmetric.offset<uint64_t>(2 * R, /*zeroed=*/true);
  }
  r.dispatch_seq = local.take<uint64_t>(2);
  r.combine_seq = local.take<uint64_t>(2);
  r.recv_count = local.take<int32_t>(2 * L);
  r.recv_layout = local.take<int32_t>(2 * L * R * 2);
  return r;
}

}  // namespace moecomm::ll
