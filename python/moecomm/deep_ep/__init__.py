"""moecomm.deep_ep: DeepEP V1's Python API (``deep_ep.Buffer``, ``Config``, ``EventOverlap``)
on top of moecomm, for frameworks written against DeepEP (vLLM, SGLang, Megatron-LM).

    import moecomm.deep_ep
    moecomm.deep_ep.install()      # `import deep_ep` now gives this module
    import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes=..., low_latency_mode=True, num_rdma_bytes=...)

:func:`virtual_buffers` makes the Buffers of several ranks in one process on one GPU (moecomm's
virtual ranks), for tests. The mapping to DeepEP and every difference: docs/deep_ep.md.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, List, Optional

from .. import _C
from . import utils
from .buffer import Buffer, DispatchHandle, LowLatencyHandle
from .config import Config
from .utils import EventHandle, EventOverlap


def __getattr__(name: str) -> Any:
    # DeepEP exports the dtype of topk_idx; torch is imported only when it is asked for.
    if name == "topk_idx_t":
        import torch

        return torch.int64
    raise AttributeError(f"module 'moecomm.deep_ep' has no attribute {name!r}")


_ALIASES = ("deep_ep", "deep_ep.utils", "deep_ep.buffer")


def install(force: bool = False, *, max_tokens_per_rank: Optional[int] = None,
            timeout_seconds: Optional[float] = None) -> types.ModuleType:
    """Registers this module as ``deep_ep`` (and ``deep_ep.utils``, ``deep_ep.buffer``) in
    ``sys.modules``, so that ``import deep_ep`` / ``from deep_ep import Buffer`` /
    ``from deep_ep.utils import EventOverlap`` get moecomm's implementation. Call it before the
    framework imports deep_ep. A real ``deep_ep`` already imported is kept unless ``force``
    (raises InvalidArgument then). Returns the module.

    ``max_tokens_per_rank`` and ``timeout_seconds``, when given, become the defaults of Buffers
    made without them (``Buffer.default_max_tokens_per_rank``, ``default_timeout_seconds``):
    a fixed HT capacity spares the per-dispatch agreement of a framework's Buffer."""
    from .buffer import _int

    if max_tokens_per_rank is not None:
        Buffer.default_max_tokens_per_rank = _int(max_tokens_per_rank, "max_tokens_per_rank", 1)
    if timeout_seconds is not None:
        Buffer.default_timeout_seconds = float(timeout_seconds)
    this = sys.modules[__name__]
    current = sys.modules.get("deep_ep")
    if current is not None and current is not this and not force:
        raise _C.InvalidArgument(
            f"install: a module 'deep_ep' is already imported ({getattr(current, '__file__', current)!r}); "
            f"call install() before it is imported, or install(force=True) to replace it")
    sys.modules["deep_ep"] = this
    sys.modules["deep_ep.utils"] = utils
    sys.modules["deep_ep.buffer"] = sys.modules[__name__ + ".buffer"]
    return this


def uninstall() -> None:
    """Removes what :func:`install` registered (modules it did not register are left alone)."""
    this = sys.modules[__name__]
    mine = {"deep_ep": this, "deep_ep.utils": utils,
            "deep_ep.buffer": sys.modules[__name__ + ".buffer"]}
    for name in _ALIASES:
        if sys.modules.get(name) is mine[name]:
            del sys.modules[name]


def installed() -> bool:
    """Whether ``import deep_ep`` gives this module."""
    return sys.modules.get("deep_ep") is sys.modules[__name__]


class BufferGroup(list):
    """The Buffers of a group of virtual ranks (a list, rank order), made by
    :func:`virtual_buffers`. As with moecomm's virtual groups, every rank must make each
    collective call before any rank's outputs are used, and an uncached high-throughput
    ``dispatch`` (it waits on the host for the counts, unless ``num_worst_tokens``) must run for
    every rank at once: use :meth:`parallel`."""

    def __init__(self, buffers: List[Buffer], shared: Any) -> None:
        super().__init__(buffers)
        self._shared = shared

    def parallel(self, fn: Callable[[int], Any]) -> List[Any]:
        """Runs ``fn(rank)`` for every rank, each on its own host thread (inheriting the caller's
        torch current stream and grad mode); returns the results in rank order."""
        return self._shared.parallel(fn)

    def synchronize(self) -> None:
        """Waits for every rank's work; raises the first device error."""
        for b in self:
            if b._stream is not None:
                b._stream.synchronize()
        self._shared.synchronize()

    def __repr__(self) -> str:
        return f"moecomm.deep_ep.BufferGroup(size={len(self)}, device={self._shared.device})"


def virtual_buffers(num_ranks: int, *, max_tokens_per_rank: int = 1024, num_nvl_bytes: int = 0,
                    num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                    explicitly_destroy: bool = False, num_sms: Optional[int] = None,
                    device: int = 0, timeout_seconds: Optional[float] = None,
                    enable_shrink: bool = False, num_nodes: int = 1) -> BufferGroup:
    """``num_ranks`` Buffers in this process, ranks of one moecomm virtual group on ``device``
    (the whole expert-parallel group on one GPU). ``max_tokens_per_rank`` is the fixed HT
    capacity (virtual ranks cannot agree on a larger one at run time); ``num_sms``: SMs of each
    rank's kernels (default: ``Buffer.num_sms``, lowered so that the ranks' HT and LL kernels
    all fit on the GPU at once). ``enable_shrink``: DeepEP's shrink mode (masked ranks), as
    ``Buffer(..., enable_shrink=True)``. ``num_nodes`` > 1 declares virtual nodes (as
    ``moecomm.virtual_group(..., nodes=)``): the Buffers then act as DeepEP's internode mode and
    need ``num_rdma_bytes > 0``.
    Import moecomm before anything starts CUDA (``CUDA_DEVICE_MAX_CONNECTIONS``)."""
    import torch

    from ._backends import VirtualBackend, VirtualShared
    from .buffer import _int, _warm_up

    num_ranks = _int(num_ranks, "num_ranks", 1)
    device = _int(device, "device", 0)
    if num_sms is None:
        # Co-located ranks spin on each other, so all their kernels must be resident at once;
        # a rank's high-throughput and low-latency communicators (two groups) may both have
        # kernels in flight, hence half the GPU for each group.
        sms = _C.device_sm_count(device)
        num_sms = max(1, min(Buffer.num_sms, sms // (2 * num_ranks)))
    num_sms = _int(num_sms, "num_sms", 1)
    num_nodes = _int(num_nodes, "num_nodes", 1)
    if num_ranks % num_nodes:
        raise _C.InvalidArgument(
            f"num_nodes: expected a divisor of num_ranks {num_ranks}, got {num_nodes}")
    shared = VirtualShared(num_ranks, device, num_nodes)
    buffers = [Buffer._on_backend(VirtualBackend(shared, r), num_nvl_bytes=num_nvl_bytes,
                                  num_rdma_bytes=num_rdma_bytes,
                                  low_latency_mode=low_latency_mode,
                                  explicitly_destroy=explicitly_destroy,
                                  enable_shrink=enable_shrink,
                                  max_tokens_per_rank=max_tokens_per_rank,
                                  timeout_seconds=timeout_seconds, num_sms=num_sms)
               for r in range(num_ranks)]
    with torch.cuda.device(device):
        for b in buffers:
            _warm_up(torch, device, b._comm_stream())
    return BufferGroup(buffers, shared)


__all__ = [
    "Buffer",
    "BufferGroup",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "install",
    "installed",
    "uninstall",
    "utils",
    "virtual_buffers",
]
