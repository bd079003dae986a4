#include "core/stream_order.hpp"

#include "runtime/cuda_check.hpp"
#include "runtime/streams.hpp"

namespace moecomm::detail {

namespace {

/// Id of the capture `stream` takes part in; 0 outside any capture.
unsigned long long capture_id(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  MOECOMM_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &id));
  return status == cudaStreamCaptureStatusActive ? id : 0;
}

}  // namespace

StreamOrder::StreamOrder(int device) : device_(device) {
  DeviceGuard guard(device_);
  MOECOMM_CUDA_CHECK(cudaEventCreateWithFlags(&tail_, cudaEventDisableTiming));
}

StreamOrder::~StreamOrder() {
  if (tail_) cudaEventDestroy(tail_);
}

void StreamOrder::before(cudaStream_t stream) {
  if (!recorded_ || stream == tail_stream_) return;
  if (capture_id(stream) != tail_capture_) return;
  MOECOMM_CUDA_CHECK(cudaStreamWaitEvent(stream, tail_, 0));
}

void StreamOrder::synchronize() {
  if (recorded_ && tail_capture_ == 0) MOECOMM_CUDA_CHECK(cudaEventSynchronize(tail_));
}

void StreamOrder::after(cudaStream_t stream) {
  MOECOMM_CUDA_CHECK(cudaEventRecord(tail_, stream));
  tail_stream_ = stream;
  tail_capture_ = capture_id(stream);
  recorded_ = true;
}

}  // namespace moecomm::detail
