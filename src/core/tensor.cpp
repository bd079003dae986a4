// TensorView: the non-owning description of a caller's tensor (or of a view into the
// communicator's buffers) that crosses the API; its element sizes and names.
#include "moecomm/tensor.hpp"

#include <string>

#include "moecomm/error.hpp"
#include "moecomm/version.hpp"

namespace moecomm {

const char* version() {
  return "0.1.0";
}

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return 2;
    case DType::kFP8E4M3:
      return 1;
    case DType::kF32:
      return 4;
    case DType::kI32:
      return 4;
    case DType::kI64:
      return 8;
    case DType::kU8:
      return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return "bf16";
    case DType::kFP8E4M3:
      return "fp8_e4m3";
    case DType::kF32:
      return "f32";
    case DType::kI32:
      return "i32";
    case DType::kI64:
      return "i64";
    case DType::kU8:
      return "u8";
  }
  return "?";
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                                  int device) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  if (shape.size() > static_cast<size_t>(kMaxTensorDims))
    throw InvalidArgument("shape: expected at most " + std::to_string(kMaxTensorDims) +
                          " dimensions, got " + std::to_string(shape.size()));
  v.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t stride = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.strides[d] = stride;
    // Past int64 the view is malformed anyway (numel() says so); keep the arithmetic defined.
    if (__builtin_mul_overflow(stride, v.shape[d], &stride)) stride = INT64_MAX;
  }
  return v;
}

namespace {

bool ndim_in_range(int ndim) {
  return ndim >= 0 && ndim <= kMaxTensorDims;
}

}  // namespace

// A view is a plain struct the caller fills in: every member function must stay defined for any
// member values (an ndim past the shape array, negative or overflowing sizes), so that argument
// checks can describe a bad view instead of reading past it.
int64_t TensorView::numel() const {
  if (ndim == 0) return 0;
  if (!ndim_in_range(ndim)) return -1;
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] < 0 || __builtin_mul_overflow(n, shape[d], &n)) return -1;
  }
  return n;
}

bool TensorView::is_contiguous() const {
  if (!ndim_in_range(ndim)) return false;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != stride) return false;
    if (__builtin_mul_overflow(stride, shape[d], &stride)) return false;
  }
  return true;
}

std::string TensorView::describe() const {
  if (!present()) return "absent";
  std::string text;  // plain string building: no iostreams in the library
  if (ndim_in_range(ndim)) {
    text = "[";
    for (int d = 0; d < ndim; ++d) text += (d ? ", " : "") + std::to_string(shape[d]);
    text += "]";
  } else {
    text = "[ndim " + std::to_string(ndim) + ", expected at most " +
           std::to_string(kMaxTensorDims) + "]";
  }
  text += std::string(" ") + dtype_name(dtype) + " on ";
  text += device == kHostDevice ? std::string("host") : "cuda:" + std::to_string(device);
  return text;
}

}  // namespace moecomm
