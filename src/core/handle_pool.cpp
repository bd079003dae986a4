// Handle storage: each dispatch's device metadata lives in a slot of a pool that the
// communicator allocates up front, and returns to the pool when the last Handle copy goes.
#include <mutex>
#include <string>
#include <vector>

#include "core/comm_impl.hpp"
#include "core/handle_state.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"

namespace moecomm::detail {

// The slot goes back when the last copy of the Handle goes: the caller decides how long a
// routing stays reusable (cached dispatch, combine), not the communicator.
HandleState::~HandleState() {
  if (pool && slot >= 0) pool->release(slot);
}

// Carves the slot the same way for both paths (a slot fits either), so that one pool serves both.
std::shared_ptr<HandleState> CommImpl::new_handle(Mode mode, int64_t num_tokens) {
  auto h = std::make_shared<HandleState>();
  const int R = num_ranks(), K = config().topk, L = config().local_experts(R);
  h->owner = this;
  h->mode = mode;
  h->mask = explicit_mask_;
  h->num_tokens = num_tokens;
  h->pool = pool_;
  h->slot = pool_->acquire();
  int32_t* base = pool_->base(h->slot);
  h->send_row = base;
  base += static_cast<size_t>(config().max_tokens_per_rank) * R;
  h->ll_slot = base;
  base += static_cast<size_t>(std::max(ctx_.ll.capacity, 1)) * K;
  h->num_recv_dev = base;  // summary: [N][per expert L][rank prefix R+1], copied in one piece
  h->recv_per_expert = base + 1;
  h->recv_rank_prefix = base + 1 + L;
  return h;
}

// A handle refers to this communicator's device memory: one from another rank or another group
// would route through the wrong slots, so it is refused rather than trusted.
HandleState& CommImpl::handle_state(const Handle& handle, Mode expected, const char* call) {
  if (!handle.valid())
    throw InvalidArgument(std::string(call) +
                          ": handle: expected the handle of a dispatch, got an empty one");
  HandleState* s = handle.state();
  if (s->owner != this)
    throw InvalidArgument(std::string(call) +
                          ": handle: it was made by another communicator (rank " +
                          "mismatch or another group); pass this rank's own dispatch handle");
  if (s->mode != expected)
    throw InvalidArgument(std::string(call) + ": handle: expected a " + mode_name(expected) +
                          " handle, got a " + mode_name(s->mode) + " one");
  return *s;
}

}  // namespace moecomm::detail
