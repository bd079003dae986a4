// DLPack <-> moecomm::TensorView for the Python extension. Any object that nanobind's
// nb::ndarray accepts (__dlpack__: torch, CuPy, JAX, NumPy, ...) becomes a non-owning view; a
// view of communicator memory goes back as a nanobind ndarray (which implements __dlpack__)
// whose owner keeps the communicator alive.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include "moecomm/tensor.hpp"

namespace moecomm::python {

namespace nb = nanobind;

/// How the element type of an input is read.
enum class InputKind {
  kGeneric,  ///< u8 stays u8
  kX,        ///< dispatch x: u8 (or DLPack float8_e4m3fn) is fp8 e4m3 bytes
};

/// A view of `obj` (None: an absent view). Raises moecomm::InvalidArgument naming `name` when
/// obj is not an array, has an unsupported dtype or more than 4 dimensions. 16-bit integers are
/// read as bf16 bits (for frameworks without bfloat16, e.g. CuPy).
TensorView to_view(nb::handle obj, const char* name, InputKind kind = InputKind::kGeneric);

/// Output options.
struct OutputOptions {
  bool bf16_as_u16 = false;  ///< bf16 leaves as uint16 bits (CuPy without bfloat16)
};

/// A nanobind ndarray (DLPack) of `v`'s memory, owned by `owner`; None when v is absent. fp8
/// leaves as uint8 bytes.
nb::object to_array(const TensorView& v, nb::handle owner, const OutputOptions& options);

}  // namespace moecomm::python
