// Ordering between streams without blocking the host: "stream B waits for what stream A has
// queued so far". Header-only, so that the bindings and ep_bench order their streams the same way.
#pragma once

#include <cuda_runtime_api.h>

#include "runtime/cuda_check.hpp"

namespace moecomm::detail {

/// Makes `device` current for the scope (CUDA's current device is per host thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    MOECOMM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device_) MOECOMM_CUDA_CHECK(cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  int device_ = -1;
};

/// `waiter` waits for the work queued on `source` so far. `mark` is an event to record that on;
/// callers that order streams on every call pass one they keep, others get a temporary event.
inline void stream_wait(cudaStream_t waiter, cudaStream_t source, cudaEvent_t mark = nullptr) {
  if (waiter == source) return;
  cudaEvent_t ev = mark;
  if (!ev) MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  cudaError_t err = cudaEventRecord(ev, source);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(waiter, ev, 0);
  if (!mark) cudaEventDestroy(ev);  // the wait keeps what it needs: the event may go at once
  MOECOMM_CUDA_CHECK(err);
}

/// Every one of `waiters` waits for the work queued on `source` so far (one record of `mark`).
inline void streams_wait(const cudaStream_t* waiters, int count, cudaStream_t source,
                         cudaEvent_t mark) {
  MOECOMM_CUDA_CHECK(cudaEventRecord(mark, source));
  for (int i = 0; i < count; ++i)
    if (waiters[i] != source) MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(waiters[i], mark, 0));
}

}  // namespace moecomm::detail
