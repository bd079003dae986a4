#include "tensors.hpp"

#include <memory>
#include <string>
#include <utility>

#include "moecomm/error.hpp"

namespace moecomm::python {

namespace {

namespace dl = nb::dlpack;

std::string dlpack_dtype_text(const dl::dtype& dt) {
  std::string code;
  switch (static_cast<dl::dtype_code>(dt.code)) {
    case dl::dtype_code::Int: code = "int"; break;
    case dl::dtype_code::UInt: code = "uint"; break;
    case dl::dtype_code::Float: code = "float"; break;
    case dl::dtype_code::Bfloat: code = "bfloat"; break;
    case dl::dtype_code::Complex: code = "complex"; break;
    case dl::dtype_code::Bool: code = "bool"; break;
    default: code = "dlpack_code" + std::to_string(dt.code) + "_bits"; break;
  }
  std::string s = code + std::to_string(dt.bits);
  if (dt.lanes != 1) s += "x" + std::to_string(dt.lanes);
  return s;
}

DType to_dtype(const dl::dtype& dt, const char* name, InputKind kind) {
  const auto code = static_cast<dl::dtype_code>(dt.code);
  if (dt.lanes == 1) {
    switch (code) {
      case dl::dtype_code::Bfloat:
        if (dt.bits == 16) return DType::kBF16;
        break;
      case dl::dtype_code::Float:
        if (dt.bits == 32) return DType::kF32;
        break;
      case dl::dtype_code::Int:
        if (dt.bits == 64) return DType::kI64;
        if (dt.bits == 32) return DType::kI32;
        if (dt.bits == 16) return DType::kBF16;  // bf16 bits
        break;
      case dl::dtype_code::UInt:
        if (dt.bits == 8) return kind == InputKind::kX ? DType::kFP8E4M3 : DType::kU8;
        if (dt.bits == 16) return DType::kBF16;  // bf16 bits
        break;
      case dl::dtype_code::Bool:
        if (dt.bits == 8) return DType::kU8;
        break;
      case dl::dtype_code::Float8_E4M3FN:
        if (dt.bits == 8) return DType::kFP8E4M3;
        break;
      default: break;
    }
  }
  throw InvalidArgument(std::string(name) + ": dtype " + dlpack_dtype_text(dt) +
                        " is not supported; expected bfloat16 (or its bits as uint16), "
                        "float8_e4m3fn (or its bytes as uint8), float32, int32 or int64");
}

}  // namespace

Input to_input(nb::handle obj, const char* name, InputKind kind) {
  Input in;
  TensorView& v = in.view;
  if (!obj.is_valid() || obj.is_none()) return in;
  // `a` holds the DLPack export: it moves into the Input at the end, so that the memory the view
  // points to stays valid for as long as the caller keeps the Input (not just until we return).
  nb::ndarray<> a;
  if (!nb::try_cast(obj, a, /*convert=*/false)) {
    const std::string type_name = Py_TYPE(obj.ptr())->tp_name;
    throw InvalidArgument(std::string(name) + ": expected an array that supports DLPack "
                          "(torch.Tensor, cupy.ndarray, jax.Array, numpy.ndarray), got " +
                          type_name);
  }
  if (a.ndim() == 0 || a.ndim() > static_cast<size_t>(kMaxTensorDims))
    throw InvalidArgument(std::string(name) + ": expected 1 to " +
                          std::to_string(kMaxTensorDims) + " dimensions, got " +
                          std::to_string(a.ndim()));
  v.dtype = to_dtype(a.dtype(), name, kind);
  v.ndim = static_cast<int>(a.ndim());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = static_cast<int64_t>(a.shape(d));
    v.strides[d] = a.stride(d);
  }
  v.data = a.data();
  switch (a.device_type()) {
    case nb::device::cuda::value:
    case nb::device::cuda_managed::value: v.device = a.device_id(); break;
    case nb::device::cpu::value:
    case nb::device::cuda_host::value: v.device = kHostDevice; break;
    default:
      throw InvalidArgument(std::string(name) + ": expected a CUDA array, got one on DLPack device type " +
                            std::to_string(a.device_type()));
  }
  in.array = std::move(a);
  return in;
}

nb::object export_owner(Input&& in) {
  if (!in.array.is_valid()) throw InvalidArgument("export_owner: the input has no DLPack export");
  // A capsule that owns the export; its destructor runs when the last array over it goes away
  // (with the GIL held, as the producer's deleter needs).
  auto held = std::make_unique<nb::ndarray<>>(std::move(in.array));
  nb::capsule owner(held.get(), [](void* p) noexcept { delete static_cast<nb::ndarray<>*>(p); });
  held.release();  // the capsule owns it now
  return owner;
}

nb::object to_array(const TensorView& v, nb::handle owner, const OutputOptions& options) {
  if (!v.present()) return nb::none();
  // Never hand out an array without an owner: nothing would keep its memory alive.
  if (!owner.is_valid() || owner.is_none())
    throw Error("internal: an array view without an owner (its memory would not be kept alive)");
  dl::dtype dt{};
  dt.lanes = 1;
  switch (v.dtype) {
    case DType::kBF16:
      dt.code = static_cast<uint8_t>(options.bf16_as_u16 ? dl::dtype_code::UInt : dl::dtype_code::Bfloat);
      dt.bits = 16;
      break;
    case DType::kFP8E4M3:  // crosses as bytes; the Python side re-types it where it can
    case DType::kU8:
      dt.code = static_cast<uint8_t>(dl::dtype_code::UInt);
      dt.bits = 8;
      break;
    case DType::kF32:
      dt.code = static_cast<uint8_t>(dl::dtype_code::Float);
      dt.bits = 32;
      break;
    case DType::kI32:
      dt.code = static_cast<uint8_t>(dl::dtype_code::Int);
      dt.bits = 32;
      break;
    case DType::kI64:
      dt.code = static_cast<uint8_t>(dl::dtype_code::Int);
      dt.bits = 64;
      break;
  }
  size_t shape[kMaxTensorDims];
  int64_t strides[kMaxTensorDims];
  for (int d = 0; d < v.ndim; ++d) {
    shape[d] = static_cast<size_t>(v.shape[d]);
    strides[d] = v.strides[d];
  }
  const bool host = v.device == kHostDevice;
  // array_api: a nanobind ndarray object with __dlpack__/__dlpack_device__ (any consumer). It
  // takes a reference to `owner` and drops it when the last consumer of the memory is done.
  nb::ndarray<nb::array_api> a(v.data, static_cast<size_t>(v.ndim), shape, owner, strides, dt,
                               host ? nb::device::cpu::value : nb::device::cuda::value,
                               host ? 0 : v.device);
  // A view, explicitly (never a copy: the array_api framework cannot copy, and the memory is
  // meant to be shared), whatever the nanobind version's `automatic` policy would pick.
  return a.cast(nb::rv_policy::reference);
}

}  // namespace moecomm::python
