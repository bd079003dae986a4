// Temporaries of one call for tensors whose data does not start on a 16-byte boundary (a view
// that starts inside a larger buffer, e.g. at an odd element offset). The kernels move rows as
// 16-byte vectors, so such a tensor goes through an aligned copy: inputs are copied in before the
// kernel, outputs are written to a temporary and copied out after it. Everything is stream
// ordered (cudaMallocAsync / cudaFreeAsync): no device-wide synchronisation while co-located
// ranks spin on each other, and the copies are captured with the call into a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "moecomm/tensor.hpp"

namespace moecomm::detail {

/// Byte alignment of the kernels' vector loads and stores.
inline constexpr uintptr_t kVectorAlignment = 16;

inline bool is_vector_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorAlignment == 0;
}

class CallStaging {
 public:
  explicit CallStaging(cudaStream_t stream) : stream_(stream) {}
  CallStaging(const CallStaging&) = delete;
  CallStaging& operator=(const CallStaging&) = delete;
  /// Frees what finish() did not (a call that threw before its launch).
  ~CallStaging();

  /// v's data, or an aligned copy of it (enqueued on the stream now).
  const void* input(const TensorView& v);
  /// v's data, or an aligned temporary that finish() copies into v.
  void* output(const TensorView& v);
  /// Enqueues the copies out and the frees; call after the kernels that use the temporaries.
  /// `stream` (nullptr: the constructor's) is where those kernels ran.
  void finish(cudaStream_t stream = nullptr);
  bool empty() const { return temps_.empty(); }

 private:
  struct CopyOut {
    void* to;
    const void* from;
    size_t bytes;
  };
  void* allocate(size_t bytes);

  cudaStream_t stream_;
  std::vector<void*> temps_;
  std::vector<CopyOut> copies_;
};

}  // namespace moecomm::detail
