// Non-owning tensor views: the only way tensors cross the public API. No framework types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace moecomm {

/// Element types moecomm reads or writes.
enum class DType : uint8_t {
  kBF16,     ///< bfloat16
  kFP8E4M3,  ///< float8 e4m3 (OCP, "fn" variant: no infinities, max 448)
  kF32,
  kI32,
  kI64,
  kU8,  ///< bytes / booleans
};

/// Size of one element in bytes.
size_t dtype_size(DType dtype);
/// Lower-case name ("bf16", "fp8_e4m3", "f32", "i32", "i64", "u8").
const char* dtype_name(DType dtype);

/// Device ordinal used by TensorView for host memory.
inline constexpr int kHostDevice = -1;
/// Largest rank of a tensor view.
inline constexpr int kMaxTensorDims = 4;

/// A view of memory owned by somebody else: pointer, element type, shape and strides (in
/// elements), and the CUDA device that holds it (kHostDevice for host memory). A view with
/// ndim == 0 and no data is "absent"; an empty tensor (a zero in its shape) may have a null
/// pointer and is still present.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kBF16;
  int ndim = 0;
  int64_t shape[kMaxTensorDims] = {};
  int64_t strides[kMaxTensorDims] = {};
  int device = kHostDevice;

  /// A row-major contiguous view; InvalidArgument for more than kMaxTensorDims dimensions.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               int device);

  bool present() const { return ndim > 0; }
  /// Number of elements; -1 for a malformed view (ndim above kMaxTensorDims or negative, a
  /// negative dimension, or a count that overflows int64).
  int64_t numel() const;
  /// Bytes of a well-formed view (numel() >= 0).
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  /// False for a malformed view.
  bool is_contiguous() const;
  /// "[4096, 7168] bf16 on cuda:0"
  std::string describe() const;

  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

}  // namespace moecomm
