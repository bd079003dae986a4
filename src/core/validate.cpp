// Argument checks shared by every call: a tensor's dtype, shape, device, contiguity and
// alignment, with messages that name the argument, what was expected and what came.
#include "core/validate.hpp"

#include <cstdint>
#include <string>

#include "moecomm/error.hpp"

namespace moecomm::detail {

namespace {

std::string expected_text(const TensorSpec& spec, int device) {
  std::string text = spec.shape_text + " ";
  bool first = true;
  for (DType d : spec.dtypes) {
    text += std::string(first ? "" : " or ") + dtype_name(d);
    first = false;
  }
  return text + ", contiguous, on cuda:" + std::to_string(device);
}

}  // namespace

void check_tensor(const TensorView& v, const TensorSpec& spec, int device) {
  auto fail = [&]() {
    throw InvalidArgument(std::string(spec.name) + ": expected " + expected_text(spec, device) +
                          ", got " + v.describe());
  };
  if (!v.present()) fail();
  bool dtype_ok = false;
  for (DType d : spec.dtypes) dtype_ok |= d == v.dtype;
  if (!dtype_ok) fail();
  if (v.ndim != static_cast<int>(spec.shape.size())) fail();
  int i = 0;
  for (int64_t s : spec.shape) {
    if (s != kAnyDim && v.shape[i] != s) fail();
    if (v.shape[i] < 0) fail();
    ++i;
  }
  if (v.numel() < 0) fail();  // an element count past int64
  if (!v.is_contiguous()) fail();
  if (v.device != device) fail();
  if (v.data == nullptr && v.numel() > 0) fail();
  // Kernels load elements at their natural alignment (rows of 16 bytes are staged when a view
  // starts off a 16-byte boundary); an element split across that boundary cannot be read.
  if (reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) != 0)
    throw InvalidArgument(std::string(spec.name) + ": expected data aligned to its element size (" +
                          std::to_string(dtype_size(v.dtype)) + " bytes for " +
                          dtype_name(v.dtype) + "), got address " +
                          std::to_string(reinterpret_cast<uintptr_t>(v.data)));
}

void check_absent(const TensorView& v, const char* name, const std::string& why) {
  if (v.present())
    throw InvalidArgument(std::string(name) + ": expected absent " + why + ", got " + v.describe());
}

void refuse_masks_across_nodes(int num_nodes, uint64_t mask, const char* call) {
  if (num_nodes > 1 && mask != 0)
    throw Unsupported(std::string(call) +
                      ": masked ranks (mask_rank) are not supported on a group "
                      "that spans " +
                      std::to_string(num_nodes) + " nodes; clear_rank_masks() first");
}

}  // namespace moecomm::detail
