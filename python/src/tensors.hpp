// DLPack <-> moecomm::TensorView for the Python extension. Any object that nanobind's
// nb::ndarray accepts (__dlpack__: torch, CuPy, JAX, NumPy, ...) becomes an Input: a non-owning
// view plus the DLPack export it points into, which is what keeps that memory valid. A view goes
// back as a nanobind ndarray (which implements __dlpack__) that always has an owner: the
// communicator for a view of communicator memory, the input's export for a view of an input.
//
// Ownership rule: DLPack guarantees a view's memory only until the export's deleter runs, not for
// as long as the object that made the export lives (a producer may hand out a copy, a converted
// layout or memory only its capsule owns). So the export (Input::array) must outlive every use of
// the view (the library call, and any array returned over the same memory).
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

/// An input array: `view` points into the DLPack export held by `array` (empty for None).
/// Keep the Input alive for as long as `view` is used, and let it go with the GIL held (its
/// release runs the producer's deleter): declare it outside any nb::gil_scoped_release block.
struct Input {
  TensorView view;
  nb::ndarray<> array;
};

/// The Input of `obj` (None: an absent view). Raises moecomm::InvalidArgument naming `name` when
/// obj is not an array, has an unsupported dtype or more than 4 dimensions. 16-bit integers are
/// read as bf16 bits (for frameworks without bfloat16, e.g. CuPy).
Input to_input(nb::handle obj, const char* name, InputKind kind = InputKind::kGeneric);

/// A Python object owning `in`'s export: the owner of an array returned over an input's memory.
nb::object export_owner(Input&& in);

/// Output options.
struct OutputOptions {
  bool bf16_as_u16 = false;  ///< bf16 leaves as uint16 bits (CuPy without bfloat16)
};

/// A zero-copy nanobind ndarray (DLPack) of `v`'s memory, holding a reference to `owner`, which
/// must keep that memory valid (raises if `owner` is not a valid object: an array without one
/// would dangle); None when v is absent. fp8 leaves as uint8 bytes.
nb::object to_array(const TensorView& v, nb::handle owner, const OutputOptions& options);

}  // namespace moecomm::python
