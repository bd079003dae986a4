"""moecomm: Mixture-of-Experts dispatch/combine communication over expert parallelism.

Tensors cross by DLPack: torch tensors, CuPy and JAX arrays (any object with ``__dlpack__``),
and outputs come back in the framework of the input. See docs/python.md.

    import moecomm, torch
    cfg = moecomm.MoECommunicatorConfig(num_experts=64, hidden=2048, topk=4,
                                        max_tokens_per_rank=512, mode="ht")
    group = moecomm.virtual_group(4, cfg)          # 4 ranks on cuda:0
    ...
"""

import os as _os

# Co-located virtual ranks need their streams on distinct hardware queues; CUDA reads this when
# it creates a context, so set it before anything starts CUDA (the library does the same when it
# is loaded). A value the user chose is kept.
_env_from_user = "CUDA_DEVICE_MAX_CONNECTIONS" in _os.environ
_os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

try:
    from . import _C
except ImportError as _e:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"moecomm: the extension moecomm._C could not be loaded ({_e}). It needs the CUDA 13 "
        f"runtime (libcudart.so.13): import torch first, or add the CUDA toolkit's lib64 to "
        f"LD_LIBRARY_PATH") from _e

from ._C import CudaError, Error, InvalidArgument, TimeoutError, Unsupported
from .communicator import (
    CombineOutput,
    DispatchOutput,
    Event,
    Handle,
    Layout,
    MoECommunicator,
    RecvHook,
)
from .config import MoECommunicatorConfig
from .groups import VirtualGroup, process_group_communicator, virtual_group
from . import groups as _groups

_groups._note_import_state(_env_from_user)

__version__ = _C.version()


def cuda_device_count() -> int:
    """Number of visible CUDA devices; 0 where there is none (never raises)."""
    return _C.cuda_device_count()


def device_sm_count(device: int = 0) -> int:
    """Number of SMs of a CUDA device (raises moecomm.Unsupported without one)."""
    return _C.device_sm_count(device)


def required_rdma_bytes(config, num_ranks: int, num_nodes: int) -> int:
    """RDMA window bytes (``MoECommunicatorConfig.rdma_bytes``) each rank needs for a group of
    ``num_ranks`` ranks on ``num_nodes`` nodes with this config (whose own ``rdma_bytes`` is
    ignored). Raises moecomm.InvalidArgument for a bad shape (``num_nodes`` must divide
    ``num_ranks``). Needs no GPU."""
    import operator

    from .groups import _as_config

    return _C.required_rdma_bytes(_as_config(config)._to_cpp(), operator.index(num_ranks),
                                  operator.index(num_nodes))


def __getattr__(name):
    # moecomm.autograd needs torch, moecomm.deep_ep is DeepEP's API: imported on first use only.
    if name in ("autograd", "deep_ep"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'moecomm' has no attribute {name!r}")


__all__ = [
    "CombineOutput",
    "CudaError",
    "DispatchOutput",
    "Error",
    "Event",
    "Handle",
    "InvalidArgument",
    "Layout",
    "MoECommunicator",
    "MoECommunicatorConfig",
    "RecvHook",
    "TimeoutError",
    "Unsupported",
    "VirtualGroup",
    "cuda_device_count",
    "device_sm_count",
    "process_group_communicator",
    "required_rdma_bytes",
    "virtual_group",
]
