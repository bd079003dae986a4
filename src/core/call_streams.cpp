// Where a call's kernels run: on the caller's stream, or (async) on the rank's second stream
// ordered after the caller's work, with an Event that marks the end. Every call also follows the
// rank's previous call when that ran on another stream (core/stream_order.hpp).
#include <memory>

#include "core/comm_impl.hpp"
#include "core/event_state.hpp"
#include "core/stream_order.hpp"
#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"

namespace moecomm::detail {

// A pending device error raises before anything is enqueued. The caller's stream is claimed for
// this rank: co-located ranks sharing a stream would serialise behind each other's spinning
// kernels.
CommImpl::Streams CommImpl::begin_call(cudaStream_t requested, bool async) {
  check_errors();
  Streams s;
  s.caller = requested ? requested : own_stream_;
  group_->claim_stream(rank_, s.caller);
  s.exec = s.caller;
  if (async) {
    stream_wait(async_stream_, s.caller);
    s.exec = async_stream_;
  }
  order_->before(s.exec);
  return s;
}

void CommImpl::note_stream_work(cudaStream_t stream) {
  order_->after(stream);
}

// Async calls hand back an Event recorded after the kernels, so that the caller can order its own
// work after them without synchronising.
Event CommImpl::end_call(const Streams& s, bool async) {
  order_->after(s.exec);
  if (!async) return {};
  auto state = std::make_shared<EventState>();
  state->device = device_;
  MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&state->event, cudaEventDisableTiming));
  MOECOMM_CUDA_CHECK(cudaEventRecord(state->event, s.exec));
  return Event(state);
}

}  // namespace moecomm::detail
