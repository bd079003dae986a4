// Argument checks shared by the calls: each failure is an InvalidArgument whose message names
// the argument and states the expected shape, dtype and device.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "moecomm/tensor.hpp"

namespace moecomm::detail {

/// A dimension that may take any value.
inline constexpr int64_t kAnyDim = -1;

struct TensorSpec {
  const char* name;
  std::initializer_list<DType> dtypes;
  std::initializer_list<int64_t> shape;  // kAnyDim where free
  std::string shape_text;                // e.g. "[T, 8]"
};

/// Checks presence, dtype, shape, contiguity and device; `device` is the rank's CUDA device.
void check_tensor(const TensorView& v, const TensorSpec& spec, int device);

/// Raises Unsupported when ranks are masked (mask_rank) in a group that spans num_nodes > 1
/// nodes: the engine's counter signals cannot leave a rank out of a call and let it rejoin.
/// `call` names the call that refuses.
void refuse_masks_across_nodes(int num_nodes, uint64_t mask, const char* call);

/// Raises unless `v` is absent.
void check_absent(const TensorView& v, const char* name, const std::string& why);

}  // namespace moecomm::detail
