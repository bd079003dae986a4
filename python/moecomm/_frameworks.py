"""Array frameworks: detection, DLPack export/import and the caller's CUDA stream.

Nothing here imports a framework unless the caller passed one of its arrays.
"""

from __future__ import annotations

import sys
from typing import Any, Optional


def stream_ptr(stream: Any) -> int:
    """The raw ``cudaStream_t`` of ``stream`` (an int, a ``torch.cuda.Stream``, a
    ``cupy.cuda.Stream`` or anything with ``cuda_stream``/``ptr``)."""
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):
        value = getattr(stream, attr, None)
        if isinstance(value, int):
            return value
    from . import _C

    raise _C.InvalidArgument(
        f"stream: expected an int (cudaStream_t), a torch.cuda.Stream or a cupy.cuda.Stream, "
        f"got {type(stream).__name__}")


def _dtype_name(a: Any) -> str:
    dt = getattr(a, "dtype", None)
    return str(getattr(dt, "name", dt)).replace("torch.", "")


class Framework:
    """Generic DLPack producer: inputs pass as they are, outputs stay nanobind ndarrays (which
    implement ``__dlpack__``), and there is no stream to order work on (calls complete on the
    host before their outputs are handed out)."""

    name = "dlpack"
    has_streams = False

    def export(self, a: Any) -> Any:
        return a

    def prepare(self, arrays) -> None:
        """Makes the inputs' producers finish writing them (frameworks without streams)."""

    def wrap(self, nd: Any, fp8: bool = False) -> Any:
        return nd

    def current_stream(self, device: int) -> Optional[int]:
        return None

    def is_fp8(self, x: Any) -> bool:
        return _dtype_name(x) in ("uint8", "float8_e4m3fn")

    bf16_as_u16 = False


class _Torch(Framework):
    name = "torch"
    has_streams = True

    def __init__(self, x: Any = None) -> None:
        import torch

        self.torch = torch

    def export(self, a: Any) -> Any:
        if a is None:
            return None
        a = a.detach()
        if a.dtype == self.torch.float8_e4m3fn:
            a = a.view(self.torch.uint8)
        return a

    def wrap(self, nd: Any, fp8: bool = False) -> Any:
        if nd is None:
            return None
        t = self.torch.from_dlpack(nd)
        if fp8:
            t = t.view(self.torch.float8_e4m3fn)
        return t

    def current_stream(self, device: int) -> Optional[int]:
        return self.torch.cuda.current_stream(device).cuda_stream


class _CuPy(Framework):
    """CuPy: bf16 crosses as uint16 bits unless the input is an ``ml_dtypes.bfloat16`` array
    (then outputs come back with that dtype)."""

    name = "cupy"
    has_streams = True

    def __init__(self, x: Any = None) -> None:
        import cupy

        self.cupy = cupy
        self.bf16_dtype = x.dtype if x is not None and _dtype_name(x) == "bfloat16" else None
        self.bf16_as_u16 = True

    def export(self, a: Any) -> Any:
        if a is not None and _dtype_name(a) == "bfloat16":
            a = a.view(self.cupy.uint16)
        return a

    def wrap(self, nd: Any, fp8: bool = False) -> Any:
        if nd is None:
            return None
        a = self.cupy.from_dlpack(nd)
        if self.bf16_dtype is not None and a.dtype == self.cupy.uint16:
            a = a.view(self.bf16_dtype)
        return a

    def current_stream(self, device: int) -> Optional[int]:
        with self.cupy.cuda.Device(device):
            return self.cupy.cuda.get_current_stream().ptr


class _Jax(Framework):
    """JAX: no stream to join, so calls finish on the host before outputs are handed out; fp8
    comes back as uint8."""

    name = "jax"
    has_streams = False

    def __init__(self, x: Any = None) -> None:
        import jax
        import jax.dlpack

        self.jax = jax

    def prepare(self, arrays) -> None:
        for a in arrays:
            if a is not None and hasattr(a, "block_until_ready"):
                a.block_until_ready()

    def wrap(self, nd: Any, fp8: bool = False) -> Any:
        if nd is None:
            return None
        return self.jax.dlpack.from_dlpack(nd)


_GENERIC = Framework()


def of(x: Any) -> Framework:
    """The framework of array ``x``."""
    root = type(x).__module__.partition(".")[0]
    if root == "torch":
        return _Torch(x)
    if root == "cupy" or (root == "cupy_backends"):
        return _CuPy(x)
    if root in ("jax", "jaxlib"):
        return _Jax(x)
    return _GENERIC


def torch_loaded():
    """The torch module if it is imported, else None (never imports it)."""
    return sys.modules.get("torch")
