// Handle, Event and RecvHook: small values returned by dispatch and combine.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "moecomm/config.hpp"

namespace moecomm {

namespace detail {
class CommImpl;
struct HandleState;
struct EventState;
}  // namespace detail

/// The routing of one dispatch: where every received row came from and where every sent row
/// went. Keep it to combine the experts' outputs (combine needs it) or to rerun dispatch with the
/// same routing (DispatchOptions::previous_handle skips the layout and the count exchange).
/// Copying a Handle is cheap (shared ownership of device metadata owned by the communicator).
/// A Handle is invalid once its communicator is destroyed.
class Handle {
 public:
  Handle() = default;
  bool valid() const { return state_ != nullptr; }
  /// kHighThroughput or kLowLatency: the path that produced it.
  Mode mode() const;
  /// Tokens T the dispatching rank passed.
  int64_t num_tokens() const;
  /// HT: rows received (N_recv) when known on the host (exact sizing or cached); -1 otherwise.
  int64_t num_recv_tokens() const;

 private:
  // Made and read by the communicator that dispatched.
  friend class detail::CommImpl;
  explicit Handle(std::shared_ptr<detail::HandleState> state) : state_(std::move(state)) {}
  detail::HandleState* state() const { return state_.get(); }

  std::shared_ptr<detail::HandleState> state_;
};

/// Completion of an asynchronous call (DispatchOptions::async / CombineOptions::async).
class Event {
 public:
  Event() = default;
  bool valid() const { return state_ != nullptr; }
  /// Blocks the host until the work is done; raises a pending TimeoutError.
  void synchronize() const;
  /// Makes `stream` wait for the work (no host synchronisation).
  void stream_wait(cudaStream_t stream) const;
  cudaEvent_t native() const;

 private:
  friend class detail::CommImpl;  // which records it at the end of an asynchronous call
  explicit Event(std::shared_ptr<detail::EventState> state) : state_(std::move(state)) {}

  std::shared_ptr<detail::EventState> state_;
};

/// The receive phase of a low-latency call, returned when return_recv_hook is set. Calling it
/// enqueues the receive kernel on `stream` (nullptr: the stream of the original call). Between
/// the send phase and the hook no SMs are held. Call it exactly once.
class RecvHook {
 public:
  RecvHook() = default;
  explicit RecvHook(std::function<void(cudaStream_t)> fn) : fn_(std::move(fn)) {}
  bool valid() const { return static_cast<bool>(fn_); }
  void operator()(cudaStream_t stream = nullptr) const;

 private:
  std::function<void(cudaStream_t)> fn_;
};

}  // namespace moecomm
