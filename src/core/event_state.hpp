// What an Event holds: a CUDA event on the device of the call that recorded it.
#pragma once

#include <cuda_runtime_api.h>

namespace moecomm::detail {

struct EventState {
  cudaEvent_t event = nullptr;
  int device = 0;
  ~EventState();
};

}  // namespace moecomm::detail
