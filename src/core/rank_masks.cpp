// Masked ranks (fault tolerance): a masked rank takes no part in this rank's calls. The device
// word every kernel reads (ctx.local.rank_mask) changes in stream order, so that a change applies
// from the next call on; the host keeps the ranks masked explicitly, and a low-latency wait that
// timed out reports the peer it masked through mapped memory.
#include <string>
#include <vector>

#include "core/comm_impl.hpp"
#include "core/stream_order.hpp"
#include "moecomm/error.hpp"
#include "runtime/streams.hpp"
#include "transport/rank_mask.hpp"

namespace moecomm::detail {

// HT and the layout exchange counts that every live rank must read alike: a time-out there stays
// an error rather than a mask one rank alone decided on.
DeviceContext CommImpl::exchange_ctx() const {
  DeviceContext c = ctx_;
  c.mask_on_timeout = 0;
  return c;
}

// A kernel, not a host write: the word may be read by this rank's kernels still queued, and a
// change must apply from the next call on, in stream order.
void CommImpl::update_mask(uint64_t set, uint64_t clear) {
  DeviceGuard guard(device_);
  check_errors();
  order_->before(own_stream_);
  transport::launch_update_rank_mask(ctx_.local.rank_mask, set, clear, own_stream_);
  order_->after(own_stream_);
}

void CommImpl::mask_rank(int rank, bool masked) {
  if (rank < 0 || rank >= num_ranks())
    throw InvalidArgument("mask_rank: rank: expected 0.." + std::to_string(num_ranks() - 1) +
                          ", got " + std::to_string(rank));
  const uint64_t bit = 1ull << rank;
  update_mask(masked ? bit : 0, masked ? 0 : bit);
  explicit_mask_ = masked ? explicit_mask_ | bit : explicit_mask_ & ~bit;
  if (!masked) reinterpret_cast<volatile int32_t*>(masked_by_timeout_)[rank] = 0;
}

void CommImpl::clear_rank_masks() {
  update_mask(0, ~0ull);
  explicit_mask_ = 0;
  for (int r = 0; r < kMaxRanks; ++r)
    reinterpret_cast<volatile int32_t*>(masked_by_timeout_)[r] = 0;
}

// Explicit masks are known on the host; time-out masks come from the device through mapped
// memory (complete once the rank's work has been synchronised).
std::vector<int> CommImpl::masked_ranks() const {
  std::vector<int> out;
  const volatile int32_t* by_timeout = masked_by_timeout_;
  for (int r = 0; r < num_ranks(); ++r)
    if (((explicit_mask_ >> r) & 1ull) || by_timeout[r]) out.push_back(r);
  return out;
}

}  // namespace moecomm::detail
