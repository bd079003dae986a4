// Keeps one rank's calls in issue order across streams. A rank's kernels share one epoch, one
// last-block ticket and one grid barrier, so a call issued on another stream than the previous
// one (an async call, a receive hook, a caller's stream) must not overlap it: the new stream
// waits for the tail of the previous call. Within one stream, stream order already does this.
#pragma once

#include <cuda_runtime_api.h>

namespace moecomm::detail {

class StreamOrder {
 public:
  explicit StreamOrder(int device);
  ~StreamOrder();
  StreamOrder(const StreamOrder&) = delete;
  StreamOrder& operator=(const StreamOrder&) = delete;

  /// Before a call's first work on `stream`: waits for the previous call's tail when that ran on
  /// another stream. A wait can only join streams in the same capture state (both outside any
  /// CUDA graph capture, or in the same one); across captures the caller orders the graph.
  void before(cudaStream_t stream);
  /// After a call's last work on `stream`: that is the tail the next call follows.
  void after(cudaStream_t stream);
  /// Blocks the host until the last call's tail (wherever it ran: a hook's stream too) is done.
  /// A tail inside a capture is not work yet: nothing to wait for.
  void synchronize();

 private:
  int device_;
  cudaEvent_t tail_ = nullptr;
  cudaStream_t tail_stream_ = nullptr;
  unsigned long long tail_capture_ = 0;  // capture id at the tail, 0 outside captures
  bool recorded_ = false;
};

}  // namespace moecomm::detail
