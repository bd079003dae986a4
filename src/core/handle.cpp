// Handle and Event: small values the caller keeps. Both share ownership of what they refer to,
// so copying them is cheap and the device memory lives as long as any copy.
#include "moecomm/handle.hpp"

#include "core/event_state.hpp"
#include "core/handle_state.hpp"
#include "moecomm/error.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/group_state.hpp"
#include "runtime/streams.hpp"

namespace moecomm {

Mode Handle::mode() const {
  if (!state_) throw InvalidArgument("handle: empty");
  return state_->mode;
}

int64_t Handle::num_tokens() const {
  if (!state_) throw InvalidArgument("handle: empty");
  return state_->num_tokens;
}

int64_t Handle::num_recv_tokens() const {
  if (!state_) throw InvalidArgument("handle: empty");
  return state_->num_recv;
}

namespace detail {
EventState::~EventState() {
  if (event) cudaEventDestroy(event);
}
}  // namespace detail

void Event::synchronize() const {
  if (!state_) throw InvalidArgument("event: empty (the call was not asynchronous)");
  MOECOMM_CUDA_CHECK(cudaEventSynchronize(state_->event));
}

void Event::stream_wait(cudaStream_t stream) const {
  if (!state_) throw InvalidArgument("event: empty (the call was not asynchronous)");
  detail::DeviceGuard guard(state_->device);
  MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, state_->event, 0));
}

cudaEvent_t Event::native() const {
  return state_ ? state_->event : nullptr;
}

void RecvHook::operator()(cudaStream_t stream) const {
  if (!fn_) throw InvalidArgument("hook: empty (the call did not ask for return_recv_hook)");
  fn_(stream);
}

}  // namespace moecomm
