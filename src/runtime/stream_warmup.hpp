// Binding a stream to the device before any collective call.
#pragma once

#include <cuda_runtime_api.h>

namespace moecomm::detail {

/// Runs an empty kernel on `stream` and waits for it. The first launch into a new stream sets it
/// up in the driver, which can wait for work already on the device; if a co-located rank is
/// spinning then, that wait lasts until the spin times out. Communicators warm their streams when
/// built, while the device is idle.
void warm_up_stream(cudaStream_t stream);

}  // namespace moecomm::detail
