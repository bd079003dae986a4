"""DeepEP's ``Config``: the tuning knobs of its chunked high-throughput kernels, and the buffer
size hints frameworks compute from them to size ``Buffer(num_nvl_bytes=..., num_rdma_bytes=...)``.

moecomm sizes its registered memory from the shapes of the calls (docs/deep_ep.md, "Memory"), so
a Config passed to ``dispatch``/``combine`` is checked and otherwise has no effect, and the hints
are estimates that keep framework code working: of the same order as DeepEP's, never used to size
anything here.
"""

from __future__ import annotations

import operator

from .. import _C

# DeepEP's intranode domain: up to 8 ranks share NVLink; more ranks make a group internode.
_NVL_PEERS = 8
# Per-row reservations of the hint, as DeepEP's ring reserves room for up to 128 top-k entries
# and 128 scales per received row.
_MAX_TOPK = 128
_MAX_SCALES = 128


def _as_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise _C.InvalidArgument(f"Config.{name}: expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise _C.InvalidArgument(f"Config.{name}: expected an integer, got {value!r}") from None


class Config:
    """``Config(num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
    num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)``, DeepEP's
    constructor with its defaults and checks (each send chunk smaller than its receive chunk; the
    RDMA receive chunk rounded up to a multiple of the send chunk and at least twice it)."""

    __slots__ = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256,
                 num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        num_sms = _as_int(num_sms, "num_sms")
        nvl_send = _as_int(num_max_nvl_chunked_send_tokens, "num_max_nvl_chunked_send_tokens")
        nvl_recv = _as_int(num_max_nvl_chunked_recv_tokens, "num_max_nvl_chunked_recv_tokens")
        rdma_send = _as_int(num_max_rdma_chunked_send_tokens, "num_max_rdma_chunked_send_tokens")
        rdma_recv = _as_int(num_max_rdma_chunked_recv_tokens, "num_max_rdma_chunked_recv_tokens")
        if num_sms < 0:
            raise _C.InvalidArgument(f"Config.num_sms: expected >= 0, got {num_sms}")
        if nvl_send <= 0 or nvl_recv <= nvl_send:
            raise _C.InvalidArgument(
                f"Config.num_max_nvl_chunked_send_tokens: expected 0 < send < recv "
                f"(num_max_nvl_chunked_recv_tokens = {nvl_recv}), got {nvl_send}")
        if rdma_send <= 0 or rdma_recv <= 0:
            raise _C.InvalidArgument(
                f"Config.num_max_rdma_chunked_send_tokens: expected > 0 with a positive receive "
                f"chunk, got send {rdma_send}, recv {rdma_recv}")
        rdma_recv = -(-rdma_recv // rdma_send) * rdma_send
        if rdma_send > rdma_recv // 2:
            raise _C.InvalidArgument(
                f"Config.num_max_rdma_chunked_send_tokens: expected at most half of "
                f"num_max_rdma_chunked_recv_tokens (rounded up to {rdma_recv}), got {rdma_send}")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = nvl_send
        self.num_max_nvl_chunked_recv_tokens = nvl_recv
        self.num_max_rdma_chunked_send_tokens = rdma_send
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of a DeepEP-style NVLink ring for rows of ``hidden_bytes`` among ``num_ranks``
        ranks (an estimate, 128-byte aligned; moecomm does not size anything from it)."""
        hidden_bytes = _as_int(hidden_bytes, "hidden_bytes")
        num_ranks = _as_int(num_ranks, "num_ranks")
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise _C.InvalidArgument(
                f"get_nvl_buffer_size_hint: expected hidden_bytes > 0 and num_ranks > 0, got "
                f"{hidden_bytes} and {num_ranks}")
        nvl_ranks = min(num_ranks, _NVL_PEERS)
        rdma_ranks = max(num_ranks // _NVL_PEERS, 1)
        slots = (self.num_sms // 2) * nvl_ranks
        rows = slots * self.num_max_nvl_chunked_recv_tokens
        per_row = hidden_bytes + 4 + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4  # data, source, top-k, scales
        total = slots * (2 * rdma_ranks + 3) * 4 + rows * per_row
        return (total + 127) // 128 * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0 for a group of up to 8 ranks (one NVLink domain, no RDMA buffer), else an estimate of
        DeepEP's RDMA ring. moecomm has no internode path yet: a group spanning nodes is refused
        by Buffer, whatever this returns."""
        hidden_bytes = _as_int(hidden_bytes, "hidden_bytes")
        num_ranks = _as_int(num_ranks, "num_ranks")
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise _C.InvalidArgument(
                f"get_rdma_buffer_size_hint: expected hidden_bytes > 0 and num_ranks > 0, got "
                f"{hidden_bytes} and {num_ranks}")
        if num_ranks <= _NVL_PEERS:
            return 0
        rdma_ranks = -(-num_ranks // _NVL_PEERS)
        slots = (self.num_sms // 2) * rdma_ranks
        rows = slots * self.num_max_rdma_chunked_recv_tokens * 2  # send and receive halves
        per_row = hidden_bytes + 16 + _MAX_TOPK * (8 + 4) + _MAX_SCALES * 4 + 16
        total = slots * (_NVL_PEERS * 2 + 2) * 2 * 4 + rows * per_row
        return (total + 127) // 128 * 128

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, "
                f"num_max_nvl_chunked_send_tokens={self.num_max_nvl_chunked_send_tokens}, "
                f"num_max_nvl_chunked_recv_tokens={self.num_max_nvl_chunked_recv_tokens}, "
                f"num_max_rdma_chunked_send_tokens={self.num_max_rdma_chunked_send_tokens}, "
                f"num_max_rdma_chunked_recv_tokens={self.num_max_rdma_chunked_recv_tokens})")


def _recommended(num_ranks, num_sms, what):
    """The config ``Buffer.get_dispatch_config``/``get_combine_config`` return: the constructor's
    defaults with ``num_sms``, for any group size. DeepEP returns per-size tuned chunk sizes of
    its ring kernels, which have no counterpart in moecomm."""
    num_ranks = _as_int(num_ranks, "num_ranks")
    if num_ranks < 1:
        raise _C.InvalidArgument(f"num_ranks: expected >= 1 ({what}), got {num_ranks}")
    return Config(num_sms)
