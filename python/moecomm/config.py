"""MoECommunicatorConfig: the Python face of ``moecomm::Config``."""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional

from . import _C

_MODES = {"ll": "ll", "low_latency": "ll", "ht": "ht", "high_throughput": "ht", "auto": "auto"}
_SCALE_FORMATS = {"f32": "f32", "float32": "f32", "pow2": "pow2", "power_of_two": "pow2"}
_ENGINES = ("auto", "loopback", "gin")

_INT_FIELDS = (
    "num_experts",
    "hidden",
    "topk",
    "max_tokens_per_rank",
    "num_sms",
    "threads_per_block",
    "expert_alignment",
    "max_recv_tokens",
    "low_latency_max_tokens",
    "auto_low_latency_max_tokens",
    "rdma_bytes",
)
_INT64_FIELDS = ("max_recv_tokens", "rdma_bytes")
_FLOAT_FIELDS = ("timeout_seconds", "nic_model_gbps", "nic_model_latency_us")


@dataclasses.dataclass
class MoECommunicatorConfig:
    """Everything a communicator needs to size its buffers and choose its kernels.

    Mirrors ``moecomm::Config`` field by field (see include/moecomm/config.hpp). The MoE shape
    (the first four fields) is required; the rest are resource hints with the C++ defaults.

    ``mode``: ``"ht"`` (high throughput: training, prefill), ``"ll"`` (low latency: decoding,
    CUDA-graph capturable) or ``"auto"`` (LL up to ``auto_low_latency_max_tokens`` tokens, HT
    above). ``scale_format``: ``"f32"`` (scale = amax / 448) or ``"pow2"`` (rounded up to a power
    of two). ``validate_inputs=None`` keeps the library default (off in release builds).

    Groups that span nodes: ``rdma_bytes`` is each rank's RDMA window (0: none, the group must
    lie in one node; :func:`moecomm.required_rdma_bytes` gives the size a group needs);
    ``nic_model_gbps`` and ``nic_model_latency_us`` make the loopback RDMA engine (virtual nodes,
    or processes of one host declared as nodes) model a NIC (0: puts complete at once).
    ``engine``: the RDMA engine between nodes, ``"auto"`` (loopback when every rank runs on one
    machine, NCCL GIN across machines), ``"loopback"`` or ``"gin"`` (docs/multinode.md).

    The fields are checked when the config is made (and again, with the group size, when a group
    is made); a violation raises :class:`moecomm.InvalidArgument` whose message names the field.
    """

    num_experts: int
    hidden: int
    topk: int
    max_tokens_per_rank: int
    mode: str = "ht"
    num_sms: int = 16
    threads_per_block: int = 512
    expert_alignment: int = 1
    enable_fp8: bool = True
    scale_format: str = "f32"
    timeout_seconds: float = 10.0
    max_recv_tokens: int = 0
    low_latency_max_tokens: int = 0
    auto_low_latency_max_tokens: int = 128
    validate_inputs: Optional[bool] = None
    mask_unresponsive_ranks: bool = False
    rdma_bytes: int = 0
    nic_model_gbps: float = 0.0
    nic_model_latency_us: float = 0.0
    engine: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.mode, str) and self.mode in _MODES:
            self.mode = _MODES[self.mode]
        if isinstance(self.scale_format, str) and self.scale_format in _SCALE_FORMATS:
            self.scale_format = _SCALE_FORMATS[self.scale_format]
        self.validate(num_ranks=1)

    # -- conversion ---------------------------------------------------------------------------
    def _to_cpp(self) -> "_C.Config":
        c = _C.Config()
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool):
                raise _C.InvalidArgument(f"Config.{name}: expected an integer, got {value!r}")
            try:
                value = operator.index(value)
            except TypeError:
                raise _C.InvalidArgument(
                    f"Config.{name}: expected an integer, got {value!r}") from None
            if name in _INT64_FIELDS:
                if not -(2**63) <= value < 2**63:
                    raise _C.InvalidArgument(
                        f"Config.{name}: expected a 64-bit integer, got {value}")
            elif not -(2**31) <= value < 2**31:
                raise _C.InvalidArgument(f"Config.{name}: expected a 32-bit integer, got {value}")
            setattr(c, name, value)
        mode = _MODES.get(self.mode) if isinstance(self.mode, str) else None
        if mode is None:
            raise _C.InvalidArgument(f"Config.mode: expected 'll', 'ht' or 'auto', got {self.mode!r}")
        c.mode = mode
        fmt = _SCALE_FORMATS.get(self.scale_format) if isinstance(self.scale_format, str) else None
        if fmt is None:
            raise _C.InvalidArgument(
                f"Config.scale_format: expected 'f32' or 'pow2', got {self.scale_format!r}")
        c.scale_format = fmt
        if not isinstance(self.engine, str) or self.engine not in _ENGINES:
            raise _C.InvalidArgument(
                f"Config.engine: expected 'auto', 'loopback' or 'gin', got {self.engine!r}")
        c.engine = self.engine
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            try:
                setattr(c, name, float(value))
            except (TypeError, ValueError):
                raise _C.InvalidArgument(
                    f"Config.{name}: expected a number, got {value!r}") from None
        c.enable_fp8 = bool(self.enable_fp8)
        c.mask_unresponsive_ranks = bool(self.mask_unresponsive_ranks)
        if self.validate_inputs is not None:
            c.validate_inputs = bool(self.validate_inputs)
        return c

    @classmethod
    def _from_cpp(cls, c: "_C.Config") -> "MoECommunicatorConfig":
        kwargs = {f.name: getattr(c, f.name) for f in dataclasses.fields(cls)}
        return cls(**kwargs)

    # -- checks and helpers -------------------------------------------------------------------
    def validate(self, num_ranks: int = 1) -> None:
        """Raises :class:`moecomm.InvalidArgument` for the first field out of range for a group
        of ``num_ranks`` ranks (e.g. ``num_experts`` not a multiple of ``num_ranks``)."""
        self._to_cpp().validate(operator.index(num_ranks))

    def local_experts(self, num_ranks: int) -> int:
        """``num_experts // num_ranks`` (experts per rank)."""
        return self._to_cpp().local_experts(operator.index(num_ranks))

    def ll_capacity(self) -> int:
        """The low-latency capacity M (tokens per source rank)."""
        return self._to_cpp().ll_capacity()

    def to_text(self) -> str:
        """``key = value`` lines, the format of tuned config files (``ep_bench --tune``)."""
        return self._to_cpp().to_text()

    def save(self, path: str) -> None:
        """Writes :meth:`to_text` to ``path``."""
        self._to_cpp().save_file(str(path))

    @classmethod
    def load(cls, path: str, **overrides) -> "MoECommunicatorConfig":
        """Reads a config file written by :meth:`save` or ``ep_bench --tune``; ``overrides``
        replace fields afterwards."""
        c = _C.Config()
        c.load_file(str(path))
        kwargs = {f.name: getattr(c, f.name) for f in dataclasses.fields(cls)}
        kwargs.update(overrides)
        return cls(**kwargs)
