"""``Buffer``: DeepEP V1's Python API (``deep_ep.Buffer``) over moecomm communicators.

Names, argument names, defaults and return tuples follow DeepEP's ``deep_ep/buffer.py``; every
difference is listed in docs/deep_ep.md. In short:

* Each call forks this Buffer's communication stream (``get_comm_stream()``) from the current
  stream (or waits for ``previous_event``), runs there, and joins back unless ``async_finish``
  (then the returned ``EventOverlap`` carries an event), as DeepEP does.
* The MoE shape comes from the calls: the first call with a new (experts, hidden, top-k, capacity)
  builds a moecomm communicator for it, collectively (every rank makes the same calls).
* HT outputs are tensors of their own (copied out of moecomm's registered buffers once, since
  frameworks keep them across later dispatches); LL ``recv_x`` is a view of the registered buffer,
  valid for two LL dispatches, which is what DeepEP documents for its LL outputs.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, List, Optional, Tuple, Union

from .. import _C
from .config import Config, _recommended
from .utils import EventHandle, EventOverlap

_FP8_GROUP = 128  # channels per fp8 scale
_UE8M0_PACK = 4  # UE8M0 scales packed per int32


def _torch():
    import torch

    return torch


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise _C.InvalidArgument(f"{name}: expected an integer >= {minimum}, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise _C.InvalidArgument(
            f"{name}: expected an integer >= {minimum}, got {type(value).__name__}") from None
    if v < minimum:
        raise _C.InvalidArgument(f"{name}: expected an integer >= {minimum}, got {v}")
    return v


def _describe(t: Any) -> str:
    shape = getattr(t, "shape", None)
    if shape is None:
        return type(t).__name__
    return f"{list(shape)} {str(t.dtype).replace('torch.', '')}" + (
        "" if getattr(t, "is_cuda", True) else " (on the CPU)")


def _expect(t: Any, name: str, dtypes: tuple, shape: tuple, text: str, device: int,
            contiguous: bool = True) -> None:
    """Raises InvalidArgument naming ``name`` unless ``t`` is a CUDA tensor of ``device`` with one
    of ``dtypes`` and ``shape`` (None: any extent)."""
    torch = _torch()
    ok = (isinstance(t, torch.Tensor) and t.dtype in dtypes and t.dim() == len(shape)
          and all(s is None or s == d for s, d in zip(shape, t.shape)))
    if ok and (not t.is_cuda or t.device.index != device):
        raise _C.InvalidArgument(f"{name}: expected a tensor on cuda:{device}, got one on {t.device}")
    if ok and contiguous and not t.is_contiguous():
        raise _C.InvalidArgument(f"{name}: expected a contiguous tensor {text}")
    if not ok:
        raise _C.InvalidArgument(f"{name}: expected {text}, got {_describe(t)}")


class DispatchHandle:
    """The opaque handle of a high-throughput :meth:`Buffer.dispatch` (DeepEP's is a tuple of
    tensors; nothing in the frameworks looks inside it). Pass it to :meth:`Buffer.combine`, or
    back to :meth:`Buffer.dispatch` as ``handle=`` for a cached dispatch."""

    __slots__ = ("buffer", "comm", "handle", "topk_idx", "num_tokens", "num_recv_rows",
                 "worst_case", "num_experts", "hidden", "topk", "__weakref__")

    def __init__(self, buffer, comm, handle, topk_idx, num_tokens, num_recv_rows, worst_case,
                 num_experts, hidden, topk) -> None:
        self.buffer = buffer
        self.comm = comm
        self.handle = handle
        self.topk_idx = topk_idx
        self.num_tokens = num_tokens
        self.num_recv_rows = num_recv_rows
        self.worst_case = worst_case
        self.num_experts = num_experts
        self.hidden = hidden
        self.topk = topk

    def __repr__(self) -> str:
        return (f"DispatchHandle(rank={self.comm.rank}, num_tokens={self.num_tokens}, "
                f"num_recv_rows={self.num_recv_rows}, worst_case={self.worst_case})")


class LowLatencyHandle:
    """The opaque handle of :meth:`Buffer.low_latency_dispatch` (DeepEP's is a tuple). Pass it to
    :meth:`Buffer.low_latency_combine` and :meth:`Buffer.get_next_low_latency_combine_buffer`.
    Keep it alive as long as a CUDA graph that captured its calls."""

    __slots__ = ("buffer", "comm", "handle", "num_max_dispatch_tokens_per_rank", "hidden",
                 "num_experts", "num_tokens", "topk", "__weakref__")

    def __init__(self, buffer, comm, handle, m, hidden, num_experts, num_tokens, topk) -> None:
        self.buffer = buffer
        self.comm = comm
        self.handle = handle
        self.num_max_dispatch_tokens_per_rank = m
        self.hidden = hidden
        self.num_experts = num_experts
        self.num_tokens = num_tokens
        self.topk = topk

    def __repr__(self) -> str:
        return (f"LowLatencyHandle(rank={self.comm.rank}, num_tokens={self.num_tokens}, "
                f"num_max_dispatch_tokens_per_rank={self.num_max_dispatch_tokens_per_rank})")


class _MaskState:
    """A low-latency communicator a shrink-mode Buffer has used: the ranks the Buffer masked on
    it (``applied``), and the ranks an update or clean unmasked since its last call (``lifted``:
    a time-out mask of theirs there no longer counts)."""

    __slots__ = ("comm", "applied", "lifted")

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.applied: set = set()
        self.lifted: set = set()


class Buffer:
    """DeepEP's ``deep_ep.Buffer`` on moecomm (see docs/deep_ep.md).

    ``Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
    num_qps_per_rank=24, allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False,
    use_fabric=False, explicitly_destroy=False, enable_shrink=False, comm=None)``: this process's
    rank of the torch.distributed ``group`` (any backend, gloo included), on the current CUDA
    device. Collective. The byte counts are recorded (``num_nvl_bytes``, ``num_rdma_bytes``)
    but moecomm sizes its registered memory from the calls' shapes; ``num_qps_per_rank``,
    ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl`` and ``use_fabric`` have no meaning
    here and are accepted. ``enable_shrink=True`` (DeepEP's shrink mode) makes the low-latency
    communicators mask a silent peer instead of raising, and enables the mask-buffer calls
    (:meth:`low_latency_update_mask_buffer` and co., on moecomm's masked ranks). ``comm``
    (mpi4py) is refused (no MPI bootstrap in Python).

    A group spanning hosts (DeepEP's internode mode: ranks of one host form a node, each a
    contiguous block of ranks, all of one size) needs ``num_rdma_bytes > 0`` as in DeepEP; each
    communicator's RDMA window (``MoECommunicatorConfig.rdma_bytes``) is then sized from its
    shape by ``moecomm.required_rdma_bytes``, so DeepEP's hint is a switch, not a size.
    ``get_num_rdma_ranks()`` is the number of nodes, ``get_rdma_rank()`` this rank's node.

    moecomm keywords: ``max_tokens_per_rank`` fixes the HT capacity (tokens per rank per call;
    default: grown on demand, which costs a host all-reduce of the token count over ``group`` per
    uncached dispatch) and ``timeout_seconds`` (device waits; default 10). When they are not
    given, the class attributes ``default_max_tokens_per_rank`` and ``default_timeout_seconds``
    apply (set by ``moecomm.deep_ep.install(...)`` for Buffers a framework makes itself).

    Attributes as DeepEP: ``rank``, ``group_size``, ``group``, ``num_nvl_bytes``,
    ``num_rdma_bytes``, ``low_latency_mode``, ``explicitly_destroy``, ``enable_shrink``; class
    attribute ``num_sms`` (SMs of each rank's kernels for communicators built afterwards).
    """

    num_sms: int = 20
    #: moecomm: the HT capacity of Buffers made without ``max_tokens_per_rank`` (None: on demand).
    default_max_tokens_per_rank: Optional[int] = None
    #: moecomm: the device time-out of Buffers made without ``timeout_seconds`` (None: 10 s).
    default_timeout_seconds: Optional[float] = None

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False,
                 enable_shrink: bool = False, comm: Any = None, *,
                 max_tokens_per_rank: Optional[int] = None,
                 timeout_seconds: Optional[float] = None) -> None:
        self._check_ctor(num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, max_tokens_per_rank)
        if group is None and comm is None:
            raise _C.InvalidArgument("group: either 'group' or 'comm' must be provided")
        if group is None:
            raise _C.Unsupported(
                "comm: moecomm bootstraps over torch.distributed only; pass the ranks' "
                "torch.distributed process group as `group` (an mpi4py communicator is not "
                "supported)")
        torch = _torch()
        from ._backends import ProcessGroupBackend

        backend = ProcessGroupBackend(group, torch.cuda.current_device())
        self._setup(backend, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                    explicitly_destroy, enable_shrink, max_tokens_per_rank, timeout_seconds,
                    num_sms=None)

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def _check_ctor(num_nvl_bytes, num_rdma_bytes, num_qps_per_rank, max_tokens_per_rank) -> None:
        _int(num_nvl_bytes, "num_nvl_bytes", 0)
        _int(num_rdma_bytes, "num_rdma_bytes", 0)
        _int(num_qps_per_rank, "num_qps_per_rank", 1)
        if max_tokens_per_rank is not None:
            _int(max_tokens_per_rank, "max_tokens_per_rank", 1)

    def _setup(self, backend, group, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
               explicitly_destroy, enable_shrink, max_tokens_per_rank, timeout_seconds,
               num_sms) -> None:
        self._backend = backend
        self.rank: int = backend.rank
        self.group_size: int = backend.num_ranks
        self.group = group
        self.num_nvl_bytes: int = int(num_nvl_bytes)
        self.num_rdma_bytes: int = int(num_rdma_bytes)
        self.low_latency_mode: bool = bool(low_latency_mode)
        self.explicitly_destroy: bool = bool(explicitly_destroy)
        self.enable_shrink: bool = bool(enable_shrink)
        self._device: int = backend.device
        if max_tokens_per_rank is None:
            max_tokens_per_rank = Buffer.default_max_tokens_per_rank
        if timeout_seconds is None:
            timeout_seconds = Buffer.default_timeout_seconds
        self._max_tokens = None if max_tokens_per_rank is None else int(max_tokens_per_rank)
        self._ht_cap: int = self._max_tokens or 0
        self._ht_cap_cfgs: list = []
        self._timeout = 10.0 if timeout_seconds is None else float(timeout_seconds)
        self._num_sms = num_sms
        self._stream = None
        self._alive = True
        # Shrink mode: the ranks masked out of low-latency calls (DeepEP's mask buffer), and per
        # low-latency communicator used so far what this Buffer has applied to it.
        self._mask: set = set()
        self._mask_comms: dict = {}
        # Nodes as DeepEP sees them: the ranks of one host (ProcessGroupBackend) or the declared
        # virtual nodes; node n holds ranks n*G .. n*G+G-1.
        self._num_nodes: int = int(backend.num_nodes)
        self._node_size: int = self.group_size // max(self._num_nodes, 1)
        if self._num_nodes > 1 and self.num_rdma_bytes == 0:
            backend.release()
            self._alive = False
            raise _C.InvalidArgument(
                f"num_rdma_bytes: the group spans {self._num_nodes} nodes, which needs an RDMA "
                f"buffer; expected > 0 (e.g. Config.get_rdma_buffer_size_hint or "
                f"Buffer.get_low_latency_rdma_size_hint), got 0")

    @classmethod
    def _on_backend(cls, backend, *, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False,
                    explicitly_destroy=False, enable_shrink=False, max_tokens_per_rank=None,
                    timeout_seconds=None, num_sms=None) -> "Buffer":
        """A Buffer over a backend made elsewhere (virtual ranks; the CPU tests' fake)."""
        cls._check_ctor(num_nvl_bytes, num_rdma_bytes, 24, max_tokens_per_rank)
        b = cls.__new__(cls)
        b._setup(backend, None, num_nvl_bytes, num_rdma_bytes, low_latency_mode,
                 explicitly_destroy, enable_shrink, max_tokens_per_rank, timeout_seconds, num_sms)
        return b

    def destroy(self) -> None:
        """Releases the communicators (DeepEP: only with ``explicitly_destroy=True``). Waits for
        this Buffer's stream first. Outputs and handles still held keep their communicator's
        memory alive; no call may follow."""
        if not self.explicitly_destroy:
            raise _C.InvalidArgument(
                "destroy: the Buffer was made with explicitly_destroy=False (its resources are "
                "released when it is garbage-collected); pass explicitly_destroy=True to call it")
        self._check_alive("destroy")
        if self._stream is not None:
            self._stream.synchronize()
        self._backend.release()
        self._mask_comms.clear()
        self._alive = False

    def _check_alive(self, what: str) -> None:
        if not self._alive:
            raise _C.InvalidArgument(f"{what}: the Buffer was destroyed")

    # -- static helpers -------------------------------------------------------------------------
    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: moecomm has no SM90-only build switch (DeepEP reports whether its SM90 features
        were compiled in)."""
        return True

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets ``Buffer.num_sms``, the SMs of each rank's kernels, for communicators built from
        then on (moecomm fixes them per communicator). Must be even, as in DeepEP."""
        v = _int(new_num_sms, "new_num_sms", 2)
        if v % 2:
            raise _C.InvalidArgument(f"new_num_sms: the SM count must be even, got {v}")
        Buffer.num_sms = v

    @staticmethod
    def capture() -> EventOverlap:
        """An event recorded on the current stream (to pass as ``previous_event``)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_experts: int) -> int:
        """Bytes of the registered memory moecomm's low-latency path takes per rank for this
        shape (two alternating buffers of bf16 receive slots, fp8 slots with their scales and
        source ids, and combine slots), rounded up to 128 MiB as DeepEP aligns its hint. Passing
        it as ``num_rdma_bytes`` is what frameworks do; moecomm sizes from the shape itself."""
        m = _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        h = _int(hidden, "hidden", 1)
        r = _int(num_ranks, "num_ranks", 1)
        e = _int(num_experts, "num_experts", 1)
        if e % r:
            raise _C.InvalidArgument(
                f"num_experts: expected a multiple of num_ranks ({r}), got {e}")
        slots = e * m  # L local experts x R sources x M tokens
        per_slot = h * 2 + h * 2 + (h // _FP8_GROUP) * 4 + 4  # dispatch, combine, scales, src
        total = 2 * slots * per_slot + 2 * e * 8 * 4  # two buffers + count signals
        align = 128 << 20
        return (total + align) // align * align

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """``Config(Buffer.num_sms)`` for any group size (moecomm has no chunk sizes to tune)."""
        return _recommended(num_ranks, Buffer.num_sms, "get_dispatch_config")

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """``Config(Buffer.num_sms)`` for any group size (moecomm has no chunk sizes to tune)."""
        return _recommended(num_ranks, Buffer.num_sms, "get_combine_config")

    # -- accessors ------------------------------------------------------------------------------
    def is_available(self) -> bool:
        return self._alive

    def is_internode_available(self) -> bool:
        """True when the group spans nodes (DeepEP: the RDMA buffer is in use)."""
        return self._num_nodes > 1

    def get_num_rdma_ranks(self) -> int:
        """Nodes of the group (DeepEP's RDMA ranks)."""
        return self._num_nodes

    def get_rdma_rank(self) -> int:
        """This rank's node."""
        return self.rank // self._node_size

    def get_root_rdma_rank(self, global_: bool) -> int:
        """As DeepEP: this rank's index in its node for ``global_``, else 0."""
        return self.rank % self._node_size if global_ else 0

    def get_local_device_id(self) -> int:
        return self._device

    def get_comm_stream(self):
        """The stream this Buffer's communication runs on (a ``torch.cuda.Stream``)."""
        self._check_alive("get_comm_stream")
        return self._comm_stream()

    def get_local_buffer_tensor(self, dtype: Any, size: Any = None, offset: int = 0,
                                use_rdma_buffer: bool = False):
        """Refused: moecomm's registered memory is laid out per communicator and shape, with no
        raw byte buffer to hand out. Use the zero-copy views instead (dispatch outputs,
        :meth:`get_next_low_latency_combine_buffer`)."""
        raise _C.Unsupported(
            "get_local_buffer_tensor: moecomm has no raw registered byte buffer to view (its "
            "registered memory is laid out per shape); use the zero-copy outputs of dispatch and "
            "get_next_low_latency_combine_buffer(handle) instead")

    # -- the low-latency mask buffer (DeepEP's shrink mode) -------------------------------------
    # DeepEP keeps one mask buffer that every low-latency kernel reads and that a time-out in
    # shrink mode writes. Here the Buffer keeps that set (self._mask) and each low-latency
    # communicator it has used gets it applied (MoECommunicator.mask_rank) before its next call;
    # a rank a communicator masked on its own (Config.mask_unresponsive_ranks) joins the set, so
    # that every other low-latency communicator masks it too, as DeepEP's single buffer does.
    def _check_shrink(self, what: str) -> None:
        self._check_alive(what)
        if not self.enable_shrink:
            raise _C.InvalidArgument(
                f"{what}: the Buffer was made with enable_shrink=False; the mask buffer needs "
                f"shrink mode (Buffer(..., enable_shrink=True)), as DeepEP asserts")

    def _fold_masks(self) -> None:
        """Adds to the set the ranks the used communicators masked on a time-out (those neither
        this Buffer applied nor an update or clean lifted since)."""
        for st in self._mask_comms.values():
            self._mask.update(set(st.comm.masked_ranks()) - st.applied - st.lifted)

    def _masks_for(self, comm: Any) -> None:
        """Before a low-latency call of ``comm``: applies the current mask set to it."""
        if not self.enable_shrink:
            return
        st = self._mask_comms.get(id(comm))
        if st is None:
            st = self._mask_comms[id(comm)] = _MaskState(comm)
        self._fold_masks()
        want = self._mask
        for r in sorted(set(comm.masked_ranks()) - want):
            comm.mask_rank(r, False)  # also lifts a time-out mask of r
        for r in sorted(want - st.applied):
            comm.mask_rank(r, True)
        st.applied = set(want)
        st.lifted = set()

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks ``rank_to_mask`` for this rank's low-latency calls from
        the next one on (DeepEP's shrink mode; needs ``enable_shrink=True``): nothing is sent to
        it or awaited from it, tokens routed to its experts are dropped (they contribute zero to
        combine) and it sends nothing. As in DeepEP every rank masks the same ranks, the masked
        one included: a rank that masks itself completes its calls alone (it exchanges only with
        itself). High-throughput calls ignore the mask, as in DeepEP."""
        self._check_shrink("low_latency_update_mask_buffer")
        r = _int(rank_to_mask, "rank_to_mask", 0)
        if r >= self.group_size:
            raise _C.InvalidArgument(
                f"rank_to_mask: expected 0..{self.group_size - 1}, got {r}")
        self._fold_masks()
        if mask:
            self._mask.add(r)
        else:
            self._mask.discard(r)
            for st in self._mask_comms.values():
                st.lifted.add(r)

    def low_latency_query_mask_buffer(self, mask_status: Any) -> None:
        """Writes the mask into ``mask_status`` (int32 with ``num_ranks`` elements, on this
        Buffer's device or the CPU): 1 where a rank is masked, by
        :meth:`low_latency_update_mask_buffer` or by a low-latency call that timed out waiting for
        it (known once that call has completed: synchronize first), 0 elsewhere. Needs
        ``enable_shrink=True``."""
        self._check_shrink("low_latency_query_mask_buffer")
        torch = _torch()
        R = self.group_size
        if (not isinstance(mask_status, torch.Tensor) or mask_status.dtype != torch.int32
                or mask_status.numel() != R):
            raise _C.InvalidArgument(
                f"mask_status: expected a torch.int32 tensor of num_ranks={R} elements, got "
                f"{_describe(mask_status)}")
        if mask_status.is_cuda and mask_status.device.index != self._device:
            raise _C.InvalidArgument(
                f"mask_status: expected a tensor on cuda:{self._device} or the CPU, got one on "
                f"{mask_status.device}")
        status = torch.tensor(self._mask_status(), dtype=torch.int32)
        mask_status.copy_(status.view(mask_status.shape))

    def _mask_status(self) -> List[int]:
        """[num_ranks]: 1 where a rank is masked for the next low-latency calls."""
        self._fold_masks()
        return [1 if r in self._mask else 0 for r in range(self.group_size)]

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank (masked by an update or by a time-out) for the next low-latency
        calls. Needs ``enable_shrink=True``."""
        self._check_shrink("low_latency_clean_mask_buffer")
        self._mask.clear()
        everyone = set(range(self.group_size))
        for st in self._mask_comms.values():
            st.lifted = set(everyone)

    # -- streams --------------------------------------------------------------------------------
    def _comm_stream(self):
        if self._stream is None:
            torch = _torch()
            s = torch.cuda.Stream(self._device)
            # A stream's first launch can wait for an idle device, which never comes while
            # co-located ranks spin: run work on it now, before any collective call uses it.
            with torch.cuda.stream(s):
                torch.zeros(1, device=torch.device("cuda", self._device)).add_(1)
            s.synchronize()
            self._stream = s
        return self._stream

    def _fork(self, previous_event: Any):
        """The communication stream waits for ``previous_event`` (or the current stream); returns
        the current stream."""
        torch = _torch()
        caller = torch.cuda.current_stream(self._device)
        comm_stream = self._comm_stream()
        if previous_event is not None:
            ev = getattr(previous_event, "event", previous_event)
            if ev is None:
                raise _C.InvalidArgument(
                    "previous_event: it holds no event (made by a call with async_finish=False)")
            if isinstance(ev, EventHandle):
                ev.stream_wait(comm_stream.cuda_stream)
            elif isinstance(ev, torch.cuda.Event):
                comm_stream.wait_event(ev)
            else:
                raise _C.InvalidArgument(
                    f"previous_event: expected an EventOverlap (e.g. Buffer.capture()), got "
                    f"{type(previous_event).__name__}")
        else:
            _C.stream_wait_stream(comm_stream.cuda_stream, caller.cuda_stream, self._device)
        return caller

    def _join(self, comm: Any, caller: Any, async_finish: bool, refs: tuple) -> EventOverlap:
        """Ends a call: with ``async_finish`` an event for the caller; otherwise the caller's
        stream waits for the communication stream (for co-located virtual ranks, once every rank
        has made the call: earlier, it would wait for a kernel that waits for a peer whose launch
        is queued behind that very wait)."""
        ev = _C.CudaEvent(self._device)
        ev.record(self._comm_stream().cuda_stream)
        if async_finish:
            return EventOverlap(EventHandle._wrap(ev, self._device), refs)
        if comm is None:
            ev.stream_wait(caller.cuda_stream)
        else:
            comm._ctx.joiner.add(comm._local, caller.cuda_stream, ev, refs)
        return EventOverlap()

    def _alloc(self, on_comm: bool, shape, dtype):
        torch = _torch()
        dev = torch.device("cuda", self._device)
        if on_comm:
            with torch.cuda.stream(self._comm_stream()):
                t = torch.empty(shape, dtype=dtype, device=dev)
            # Allocated for the communication stream and handed to the current one.
            t.record_stream(torch.cuda.current_stream(self._device))
            return t
        return torch.empty(shape, dtype=dtype, device=dev)

    @staticmethod
    def _check_stream_flags(previous_event, async_finish, allocate_on_comm_stream) -> None:
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise _C.InvalidArgument(
                "allocate_on_comm_stream: needs previous_event and async_finish=True (as in "
                "DeepEP)")

    @staticmethod
    def _check_config(config: Any) -> None:
        if config is not None and not isinstance(config, Config):
            raise _C.InvalidArgument(
                f"config: expected a moecomm.deep_ep.Config or None, got {type(config).__name__}")

    # -- communicators --------------------------------------------------------------------------
    def _cfg(self, mode: str, num_experts: int, hidden: int, topk: int, tokens: int,
             pow2: bool = False, max_recv_tokens: int = 0):
        from ..config import MoECommunicatorConfig

        cfg = MoECommunicatorConfig(
            num_experts=num_experts, hidden=hidden, topk=topk, max_tokens_per_rank=tokens,
            mode=mode, num_sms=self._num_sms or Buffer.num_sms,
            enable_fp8=hidden % _FP8_GROUP == 0, scale_format="pow2" if pow2 else "f32",
            timeout_seconds=self._timeout, max_recv_tokens=max_recv_tokens,
            low_latency_max_tokens=tokens if mode == "ll" else 0,
            # Shrink mode: a silent peer is masked, as DeepEP's LL kernels do; HT never masks.
            mask_unresponsive_ranks=self.enable_shrink and mode == "ll")
        if self._num_nodes > 1:
            # num_rdma_bytes says that the Buffer may use RDMA (DeepEP's layout sizes it); each
            # communicator's window is what its shape needs (moecomm.required_rdma_bytes).
            cfg.rdma_bytes = _C.required_rdma_bytes(cfg._to_cpp(), self.group_size,
                                                    self._num_nodes)
        return cfg

    def _ht_capacity(self, num_tokens: int) -> int:
        """Tokens per rank the HT communicator must take: fixed, or agreed by every rank (the
        largest T of this call, rounded up to a power of two so that it rarely grows)."""
        if self._max_tokens is not None:
            if num_tokens > self._max_tokens:
                raise _C.InvalidArgument(
                    f"x: {num_tokens} tokens, expected at most max_tokens_per_rank = "
                    f"{self._max_tokens} (the Buffer's fixed HT capacity)")
            return self._max_tokens
        needed = self._backend.agree_max(num_tokens)
        if needed > self._ht_cap:
            grown = max(128, 1 << max(needed - 1, 1).bit_length())
            # Older communicators stay alive through their handles only.
            for cfg in self._ht_cap_cfgs:
                self._backend.forget(cfg)
            self._ht_cap_cfgs = []
            self._ht_cap = grown
        return self._ht_cap

    # -- high throughput ------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: Any, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """The routing layout of ``topk_idx`` ([num_tokens, num_topk] int64, -1: none), computed
        locally (no communication). Returns ``(num_tokens_per_rank [R] int32,
        num_tokens_per_rdma_rank [num_nodes] int32 (None on one node), num_tokens_per_expert [E]
        int32, is_token_in_rank [T, R] bool, event)``."""
        self._check_alive("get_dispatch_layout")
        self._check_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        R = self.group_size
        E = _int(num_experts, "num_experts", 1)
        if E % R:
            raise _C.InvalidArgument(
                f"num_experts: expected a multiple of the group size ({R}), got {E}")
        torch = _torch()
        _expect(topk_idx, "topk_idx", (torch.int64, torch.int32), (None, None),
                "[num_tokens, num_topk] torch.int64", self._device)
        T = topk_idx.shape[0]
        caller = self._fork(previous_event)
        per_rank = self._alloc(allocate_on_comm_stream, (R,), torch.int32)
        per_expert = self._alloc(allocate_on_comm_stream, (E,), torch.int32)
        in_rank = self._alloc(allocate_on_comm_stream, (T, R), torch.bool)
        per_node = None
        if self._num_nodes > 1:
            per_node = self._alloc(allocate_on_comm_stream, (self._num_nodes,), torch.int32)
        with torch.cuda.stream(self._comm_stream()):
            _layout(torch, topk_idx, E, R, per_rank, per_expert, in_rank)
            if per_node is not None:  # tokens with a destination among each node's ranks
                per_node.copy_(in_rank.view(T, self._num_nodes, self._node_size).any(dim=2)
                               .sum(dim=0, dtype=torch.int32))
        event = self._join(None, caller, async_finish,
                           (topk_idx, per_rank, per_expert, in_rank))
        return per_rank, per_node, per_expert, in_rank, event

    def dispatch(self, x: Any, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Any = None, num_tokens_per_rdma_rank: Any = None,
                 is_token_in_rank: Any = None, num_tokens_per_expert: Any = None,
                 topk_idx: Any = None, topk_weights: Any = None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Any = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """High-throughput dispatch (DeepEP's ``Buffer.dispatch``, intranode).

        ``x``: bf16 ``[T, H]``, or ``(x_fp8 [T, H] float8_e4m3fn, scales [T, H/128] float32)``.
        Without ``handle``: ``num_tokens_per_rank``, ``is_token_in_rank``,
        ``num_tokens_per_expert`` (from :meth:`get_dispatch_layout`; their number of experts is
        taken from the last), ``topk_idx`` and ``topk_weights`` are needed. With ``handle``: a
        cached dispatch with that routing (``topk_idx``/``topk_weights`` must be None).
        ``num_worst_tokens > 0``: no host synchronisation, outputs have that many rows (rows past
        the received count have ``recv_topk_idx`` -1) and the count list is empty.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``; ``recv_x`` is a tuple ``(fp8, scales)`` for fp8 input; a cached
        dispatch returns ``(recv_x, None, None, None, None, event)``. Rows are ordered by source
        rank, then source token. Every output is a tensor of its own.
        """
        self._check_alive("dispatch")
        self._check_config(config)
        # num_tokens_per_rdma_rank (DeepEP's internode layout hint) is accepted like the other
        # layout hints: the communicator derives every count from topk_idx itself.
        self._check_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        alignment = _int(expert_alignment, "expert_alignment", 1)
        worst = _int(num_worst_tokens, "num_worst_tokens", 0)
        if handle is not None:
            if not isinstance(handle, DispatchHandle) or handle.buffer is not self:
                raise _C.InvalidArgument(
                    f"handle: expected the DispatchHandle of a dispatch of this Buffer, got "
                    f"{type(handle).__name__}" + (" of another Buffer"
                                                  if isinstance(handle, DispatchHandle) else ""))
            if topk_idx is not None or topk_weights is not None:
                raise _C.InvalidArgument(
                    "topk_idx, topk_weights: expected None with handle= (a cached dispatch "
                    "reuses the handle's routing)")
        torch = _torch()
        x, x_scales = self._unpack_x(torch, x)
        T, H = x.shape
        if handle is not None:
            return self._cached_dispatch(torch, x, x_scales, handle, previous_event,
                                         async_finish, allocate_on_comm_stream)
        R = self.group_size
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                            ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert),
                            ("topk_idx", topk_idx)):
            if value is None:
                raise _C.InvalidArgument(
                    f"{name}: required for a dispatch without handle= (from "
                    f"get_dispatch_layout; moecomm routes by topk_idx)")
        _expect(num_tokens_per_expert, "num_tokens_per_expert", (torch.int32,), (None,),
                "[num_experts] torch.int32", self._device)
        E = num_tokens_per_expert.shape[0]
        if E == 0 or E % R:
            raise _C.InvalidArgument(
                f"num_tokens_per_expert: expected [num_experts] with num_experts a positive "
                f"multiple of the group size ({R}), got {E} experts")
        _expect(num_tokens_per_rank, "num_tokens_per_rank", (torch.int32,), (R,),
                f"[num_ranks={R}] torch.int32", self._device)
        _expect(is_token_in_rank, "is_token_in_rank", (torch.bool,), (T, R),
                f"[num_tokens={T}, num_ranks={R}] torch.bool", self._device)
        _expect(topk_idx, "topk_idx", (torch.int64, torch.int32), (T, None),
                f"[num_tokens={T}, num_topk] torch.int64", self._device)
        K = topk_idx.shape[1]
        if topk_weights is not None:
            _expect(topk_weights, "topk_weights", (torch.float32,), (T, K),
                    f"[num_tokens={T}, num_topk={K}] torch.float32", self._device)
        cap = self._ht_capacity(T)
        cfg = self._cfg("ht", E, H, K, cap, max_recv_tokens=worst)
        comm = self._backend.communicator(cfg)
        if cfg not in self._ht_cap_cfgs:
            self._ht_cap_cfgs.append(cfg)
        caller = self._fork(previous_event)
        out, mh = comm.dispatch(x, topk_idx, topk_weights, x_scales=x_scales,
                                sizing="worst_case" if worst else "exact",
                                stream=self._comm_stream().cuda_stream)
        on_comm = allocate_on_comm_stream
        rows = out.recv_x.shape[0]
        recv_x = self._alloc(on_comm, (rows, H), x.dtype)
        recv_scales = (self._alloc(on_comm, tuple(out.recv_x_scales.shape), torch.float32)
                       if x_scales is not None else None)
        recv_idx = self._alloc(on_comm, (rows, K), torch.int64)
        recv_w = self._alloc(on_comm, (rows, K), torch.float32) if topk_weights is not None else None
        with torch.cuda.stream(self._comm_stream()):
            recv_x.copy_(out.recv_x)
            if recv_scales is not None:
                recv_scales.copy_(out.recv_x_scales)
            recv_idx.copy_(out.recv_topk_idx)
            if recv_w is not None:
                recv_w.copy_(out.recv_topk_weights)
            if worst:
                # As DeepEP: rows past the received count select no expert.
                past = (torch.arange(rows, device=recv_idx.device, dtype=torch.int32)
                        >= out.num_recv_tokens_device)
                recv_idx.masked_fill_(past[:, None], -1)
                if recv_w is not None:
                    recv_w.masked_fill_(past[:, None], 0.0)
        counts: List[int] = [] if worst else [
            -(-c // alignment) * alignment for c in out.num_recv_tokens_per_expert_host]
        new_handle = DispatchHandle(self, comm, mh, topk_idx, T, rows, bool(worst), E, H, K)
        event = self._join(comm, caller, async_finish,
                           (x, x_scales, topk_idx, topk_weights, recv_x, recv_scales, recv_idx,
                            recv_w))
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, recv_idx, recv_w, counts, new_handle, event

    def _cached_dispatch(self, torch, x, x_scales, handle, previous_event, async_finish,
                         allocate_on_comm_stream):
        T, H = x.shape
        if T != handle.num_tokens or H != handle.hidden:
            raise _C.InvalidArgument(
                f"x: expected [num_tokens={handle.num_tokens}, hidden={handle.hidden}] (the "
                f"handle's dispatch), got {_describe(x)}")
        comm = handle.comm
        caller = self._fork(previous_event)
        out, _ = comm.dispatch(x, handle.topk_idx, None, x_scales=x_scales,
                               sizing="worst_case" if handle.worst_case else "exact",
                               previous_handle=handle.handle,
                               stream=self._comm_stream().cuda_stream)
        on_comm = allocate_on_comm_stream
        recv_x = self._alloc(on_comm, tuple(out.recv_x.shape), x.dtype)
        recv_scales = (self._alloc(on_comm, tuple(out.recv_x_scales.shape), torch.float32)
                       if x_scales is not None else None)
        with torch.cuda.stream(self._comm_stream()):
            recv_x.copy_(out.recv_x)
            if recv_scales is not None:
                recv_scales.copy_(out.recv_x_scales)
        event = self._join(comm, caller, async_finish,
                           (x, x_scales, handle, recv_x, recv_scales))
        recv = (recv_x, recv_scales) if x_scales is not None else recv_x
        return recv, None, None, None, None, event

    def _unpack_x(self, torch, x):
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise _C.InvalidArgument(
                    f"x: expected a tensor or a tuple (x_fp8, scales), got a tuple of {len(x)}")
            x, scales = x
            _expect(x, "x[0]", (torch.float8_e4m3fn,), (None, None),
                    "[num_tokens, hidden] torch.float8_e4m3fn", self._device)
            T, H = x.shape
            if H % _FP8_GROUP:
                raise _C.InvalidArgument(f"x[0]: hidden must be a multiple of 128 for fp8, got {H}")
            _expect(scales, "x[1]", (torch.float32,), (T, H // _FP8_GROUP),
                    f"[num_tokens={T}, hidden/128={H // _FP8_GROUP}] torch.float32 (moecomm "
                    f"takes one fp32 scale per 128 channels)", self._device, contiguous=False)
            return x, scales.contiguous()
        _expect(x, "x", (torch.bfloat16,), (None, None), "[num_tokens, hidden] torch.bfloat16",
                self._device)
        return x, None

    def combine(self, x: Any, handle: DispatchHandle, topk_weights: Any = None,
                bias: Union[Any, Tuple[Any, Any]] = None, config: Optional[Config] = None,
                previous_event: Any = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """High-throughput combine (DeepEP's ``Buffer.combine``): sums, without weights, the rows
        ``x`` (bf16 ``[num_recv_rows, H]``, one per row dispatch delivered) back into their
        tokens; ``topk_weights`` (``[num_recv_rows, K]`` float32) are summed the same way; ``bias``
        (one or two bf16 ``[T, H]``) is added at the end. Returns ``(combined_x [T, H] bf16,
        combined_topk_weights [T, K] or None, event)``."""
        self._check_alive("combine")
        self._check_config(config)
        self._check_stream_flags(previous_event, async_finish, allocate_on_comm_stream)
        if not isinstance(handle, DispatchHandle) or handle.buffer is not self:
            raise _C.InvalidArgument(
                f"handle: expected the DispatchHandle of a dispatch of this Buffer, got "
                f"{type(handle).__name__}")
        torch = _torch()
        N, T, H, K = handle.num_recv_rows, handle.num_tokens, handle.hidden, handle.topk
        _expect(x, "x", (torch.bfloat16,), (N, H),
                f"[num_recv_tokens={N}, hidden={H}] torch.bfloat16", self._device)
        if topk_weights is not None:
            _expect(topk_weights, "topk_weights", (torch.float32,), (N, K),
                    f"[num_recv_tokens={N}, num_topk={K}] torch.float32", self._device)
        biases: list = []
        if bias is not None:
            biases = list(bias) if isinstance(bias, (tuple, list)) else [bias]
            if len(biases) not in (1, 2):
                raise _C.InvalidArgument(
                    f"bias: expected a tensor or a tuple of two, got a tuple of {len(biases)}")
            for i, b in enumerate(biases):
                _expect(b, f"bias[{i}]" if len(biases) > 1 else "bias", (torch.bfloat16,),
                        (T, H), f"[num_tokens={T}, hidden={H}] torch.bfloat16", self._device)
        comm = handle.comm
        caller = self._fork(previous_event)
        out = self._alloc(allocate_on_comm_stream, (T, H), torch.bfloat16)
        cw = (self._alloc(allocate_on_comm_stream, (T, K), torch.float32)
              if topk_weights is not None else None)
        b = None
        if biases:
            b = biases[0]
            if len(biases) == 2:
                # moecomm adds one bias: the two are summed in fp32 and rounded to bf16 first.
                with torch.cuda.stream(self._comm_stream()):
                    b = (biases[0].float() + biases[1].float()).to(torch.bfloat16)
        res = comm.combine(x, handle.handle, recv_topk_weights=topk_weights, bias=b, out=out,
                           stream=self._comm_stream().cuda_stream)
        if cw is not None:
            with torch.cuda.stream(self._comm_stream()):
                cw.copy_(res.combined_topk_weights)
        event = self._join(comm, caller, async_finish,
                           (x, topk_weights, handle, b, *biases, out, cw))
        return out, cw, event

    # -- low latency ----------------------------------------------------------------------------
    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int,
                                 num_experts: int) -> None:
        """Nothing to do: moecomm's low-latency buffers are separate from the high-throughput
        ones and reset their own signals, so they are never left dirty. The arguments are
        checked."""
        self._check_alive("clean_low_latency_buffer")
        _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        _int(hidden, "hidden", 1)
        e = _int(num_experts, "num_experts", 1)
        if e % self.group_size:
            raise _C.InvalidArgument(
                f"num_experts: expected a multiple of the group size ({self.group_size}), got {e}")

    def _check_ll(self, what: str, async_finish: bool, return_recv_hook: bool) -> None:
        self._check_alive(what)
        if not self.low_latency_mode:
            raise _C.InvalidArgument(
                f"{what}: the Buffer was made with low_latency_mode=False; low-latency calls "
                f"need low_latency_mode=True (as in DeepEP)")
        if async_finish and return_recv_hook:
            raise _C.InvalidArgument(
                "async_finish, return_recv_hook: expected at most one of them (as in DeepEP)")

    def low_latency_dispatch(self, x: Any, topk_idx: Any, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Any = None,
                             dispatch_wait_recv_cost_stats: Any = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Low-latency dispatch (DeepEP's ``Buffer.low_latency_dispatch``): one message per
        (token, selected expert), into fixed slots; no host synchronisation, CUDA-graph
        capturable.

        Returns ``(recv_x, recv_count, handle, event, hook)``. ``recv_x``: bf16
        ``[L, R*M, H]`` (M = num_max_dispatch_tokens_per_rank), or with ``use_fp8``
        ``(x_fp8 [L, R*M, H] float8_e4m3fn, scales)`` with ``scales`` float32 ``[L, R*M, H/128]``
        (``use_ue8m0``: int32 ``[L, R*M, H/512]``, four UE8M0 exponents per int, the lowest byte
        the first group), the last two dimensions column-major as in DeepEP. Slots of source rank
        s for local expert e are ``[e, s*M : s*M + n)``, ascending source token. ``recv_x`` and
        ``recv_count`` ([L] int32) are views of the registered buffer, valid until the
        next-but-one low-latency dispatch; the scales are a tensor of their own."""
        self._check_ll("low_latency_dispatch", async_finish, return_recv_hook)
        if use_ue8m0 and not round_scale:
            raise _C.InvalidArgument(
                "use_ue8m0: UE8M0 scales need round_scale=True (power-of-two scales), as in DeepEP")
        if use_ue8m0 and not use_fp8:
            raise _C.InvalidArgument("use_ue8m0: needs use_fp8=True")
        if dispatch_wait_recv_cost_stats is not None:
            raise _C.Unsupported(
                "dispatch_wait_recv_cost_stats: moecomm does not time its receive waits per "
                "source rank; pass None")
        M = _int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        E = _int(num_experts, "num_experts", 1)
        R = self.group_size
        if E % R:
            raise _C.InvalidArgument(
                f"num_experts: expected a multiple of the group size ({R}), got {E}")
        L = E // R
        torch = _torch()
        _expect(x, "x", (torch.bfloat16,), (None, None), "[num_tokens, hidden] torch.bfloat16",
                self._device)
        T, H = x.shape
        if T > M:
            raise _C.InvalidArgument(
                f"x: {T} tokens, expected at most num_max_dispatch_tokens_per_rank = {M}")
        if use_fp8 and H % (_FP8_GROUP * (_UE8M0_PACK if use_ue8m0 else 1)):
            raise _C.InvalidArgument(
                f"x: hidden must be a multiple of {_FP8_GROUP * (_UE8M0_PACK if use_ue8m0 else 1)}"
                f" with use_fp8{' and use_ue8m0' if use_ue8m0 else ''}, got {H}")
        _expect(topk_idx, "topk_idx", (torch.int64, torch.int32), (T, None),
                f"[num_tokens={T}, num_topk] torch.int64", self._device)
        K = topk_idx.shape[1]
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            _expect(stats, "cumulative_local_expert_recv_stats", (torch.int32,), (L,),
                    f"[num_local_experts={L}] torch.int32", self._device)
        cfg = self._cfg("ll", E, H, K, M, pow2=bool(use_fp8 and round_scale))
        comm = self._backend.communicator(cfg)
        self._masks_for(comm)
        caller = self._fork(None)
        cs = self._comm_stream()
        out, mh = comm.dispatch(x, topk_idx, None, quantize_fp8=bool(use_fp8),
                                return_recv_hook=bool(return_recv_hook), stream=cs.cuda_stream)
        recv_x, recv_count = out.recv_x, out.recv_count
        scales = None
        if use_fp8:
            G = H // _FP8_GROUP
            if use_ue8m0:
                scales = self._alloc(False, (L, G // _UE8M0_PACK, R * M), torch.int32).transpose(1, 2)
            else:
                scales = self._alloc(False, (L, G, R * M), torch.float32).transpose(1, 2)
        src_scales = out.recv_x_scales if use_fp8 else None

        def finish_receive() -> None:
            with torch.cuda.stream(cs):
                if scales is not None:
                    _store_scales(torch, src_scales, scales, use_ue8m0)
                if stats is not None:
                    stats.add_(recv_count)

        new_handle = LowLatencyHandle(self, comm, mh, M, H, E, T, K)
        refs = (x, topk_idx, stats, recv_x, scales, recv_count)
        recv = (recv_x, scales) if use_fp8 else recv_x
        if not return_recv_hook:
            finish_receive()
            event = self._join(comm, caller, async_finish, refs)
            return recv, recv_count, new_handle, event, None
        self._join(comm, caller, False, refs)  # after the send phase
        hook = self._recv_hook(comm, out.hook, finish_receive, refs)
        return recv, recv_count, new_handle, EventOverlap(), hook

    def _recv_hook(self, comm, moecomm_hook, after: Optional[Callable[[], None]], refs) -> Callable:
        called = []

        def hook() -> None:
            """Receives the data of the matching low-latency call (call it once, on every
            rank)."""
            if called:
                raise _C.InvalidArgument("hook: already called; a receive hook runs exactly once")
            called.append(True)
            caller = self._fork(None)
            moecomm_hook()
            if after is not None:
                after()
            self._join(comm, caller, False, refs)

        return hook

    def low_latency_combine(self, x: Any, topk_idx: Any, topk_weights: Any,
                            handle: LowLatencyHandle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Any = None,
                            combine_wait_recv_cost_stats: Any = None):
        """Low-latency combine (DeepEP's ``Buffer.low_latency_combine``): ``combined_x[t] =
        sum_k topk_weights[t, k] * x[slot of (t, k)]`` in fp32, bf16 out. ``x``: bf16
        ``[L, R*M, H]`` (or :meth:`get_next_low_latency_combine_buffer` filled in place, with
        ``zero_copy=True``). ``topk_idx`` (checked against the handle) and ``topk_weights``
        ``[T, K]``. ``use_logfmt`` is accepted and sends bf16 (moecomm has no LogFMT
        compression: the result is the exact bf16 combine). Returns ``(combined_x, event,
        hook)``; ``combined_x`` is ``out`` when given, else a new tensor."""
        self._check_ll("low_latency_combine", async_finish, return_recv_hook)
        if combine_wait_recv_cost_stats is not None:
            raise _C.Unsupported(
                "combine_wait_recv_cost_stats: moecomm does not time its receive waits per "
                "source rank; pass None")
        if not isinstance(handle, LowLatencyHandle) or handle.buffer is not self:
            raise _C.InvalidArgument(
                f"handle: expected the LowLatencyHandle of a low_latency_dispatch of this "
                f"Buffer, got {type(handle).__name__}")
        torch = _torch()
        R, M, H, E = (self.group_size, handle.num_max_dispatch_tokens_per_rank, handle.hidden,
                      handle.num_experts)
        L, T, K = E // R, handle.num_tokens, handle.topk
        _expect(x, "x", (torch.bfloat16,), (L, R * M, H),
                f"[num_local_experts={L}, num_ranks*num_max_dispatch_tokens_per_rank={R * M}, "
                f"hidden={H}] torch.bfloat16", self._device)
        _expect(topk_idx, "topk_idx", (torch.int64, torch.int32), (T, K),
                f"[num_tokens={T}, num_topk={K}] torch.int64 (the dispatch's)", self._device)
        _expect(topk_weights, "topk_weights", (torch.float32,), (T, K),
                f"[num_tokens={T}, num_topk={K}] torch.float32", self._device)
        if out is not None:
            _expect(out, "out", (torch.bfloat16,), (T, H),
                    f"[num_tokens={T}, hidden={H}] torch.bfloat16", self._device)
        else:
            out = self._alloc(False, (T, H), torch.bfloat16)
        comm = handle.comm
        self._masks_for(comm)
        caller = self._fork(None)
        res = comm.combine(x, handle.handle, topk_weights=topk_weights, out=out,
                           return_recv_hook=bool(return_recv_hook),
                           stream=self._comm_stream().cuda_stream)
        refs = (x, topk_idx, topk_weights, handle, out)
        if not return_recv_hook:
            event = self._join(comm, caller, async_finish, refs)
            return out, event, None
        self._join(comm, caller, False, refs)
        return out, EventOverlap(), self._recv_hook(comm, res.hook, None, refs)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle):
        """The registered bf16 ``[L, R*M, H]`` buffer that :meth:`low_latency_combine` reads for
        ``handle``: write the experts' output there and combine with ``zero_copy=True``."""
        self._check_alive("get_next_low_latency_combine_buffer")
        if not isinstance(handle, LowLatencyHandle) or handle.buffer is not self:
            raise _C.InvalidArgument(
                f"handle: expected the LowLatencyHandle of a low_latency_dispatch of this "
                f"Buffer, got {type(handle).__name__}")
        return handle.comm.combine_buffer(handle.handle)

    def __repr__(self) -> str:
        return (f"moecomm.deep_ep.Buffer(rank={self.rank}, group_size={self.group_size}, "
                f"low_latency_mode={self.low_latency_mode}"
                f"{'' if self._alive else ', destroyed'})")


# ---------------------------------------------------------------------------------------------
def _layout(torch, topk_idx, E: int, R: int, per_rank, per_expert, in_rank) -> None:
    """DeepEP's dispatch layout in plain torch ops: no host synchronisation, deterministic
    (sort + searchsorted instead of atomics), CUDA-graph capturable."""
    L = E // R
    idx = topk_idx.long()
    valid = idx >= 0
    owner = torch.where(valid, torch.div(idx, L, rounding_mode="floor"), torch.full_like(idx, -1))
    ranks = torch.arange(R, device=idx.device)
    in_rank.copy_((owner[:, :, None] == ranks).any(dim=1))
    per_rank.copy_(in_rank.sum(dim=0, dtype=torch.int32))
    # Tokens per expert: each row names an expert at most once, so count (token, k) pairs.
    flat = torch.where(valid, idx, torch.full_like(idx, E)).flatten()
    ordered, _ = torch.sort(flat)
    bounds = torch.searchsorted(ordered, torch.arange(E + 1, device=idx.device))
    per_expert.copy_((bounds[1:] - bounds[:-1]).to(torch.int32))


def _store_scales(torch, src, dst, ue8m0: bool) -> None:
    """moecomm's row-major fp32 scales [L, R*M, G] into DeepEP's column-major ``dst``: fp32 as
    they are, or (UE8M0) each power-of-two scale's biased exponent byte, four per int32, group
    4j + b in byte b of int j."""
    if not ue8m0:
        dst.copy_(src)
        return
    L, RM, G = src.shape
    exponents = torch.bitwise_right_shift(src.contiguous().view(torch.int32), 23).to(torch.uint8)
    packed = exponents.view(L, RM, G // _UE8M0_PACK, _UE8M0_PACK).view(torch.int32)
    dst.copy_(packed.view(L, RM, G // _UE8M0_PACK))


def _warm_up(torch, device: int, stream) -> None:
    """Runs, once, the torch kernels the Buffer queues behind communication kernels. Co-located
    virtual ranks spin on each other, and the first launch of a kernel that is not loaded yet may
    wait for the device to idle, which it never does while a peer's launch is still to come."""
    dev = torch.device("cuda", device)
    with torch.cuda.stream(stream):
        idx = torch.tensor([[0, 3], [-1, 2]], dtype=torch.int64, device=dev)
        _layout(torch, idx, 4, 2, torch.empty(2, dtype=torch.int32, device=dev),
                torch.empty(4, dtype=torch.int32, device=dev),
                torch.empty(2, 2, dtype=torch.bool, device=dev))
        for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.int64,
                      torch.int32):
            src = torch.zeros(4, 8, device=dev).to(dtype)
            torch.empty_like(src).copy_(src)
        rows = torch.full((4, 2), 1, dtype=torch.int64, device=dev)
        w = torch.ones(4, 2, device=dev)
        past = torch.arange(4, device=dev, dtype=torch.int32) >= torch.ones(1, dtype=torch.int32,
                                                                              device=dev)
        rows.masked_fill_(past[:, None], -1)
        w.masked_fill_(past[:, None], 0.0)
        scales = torch.ones(1, 4, 8, device=dev)
        _store_scales(torch, scales, torch.empty(1, 8, 4, device=dev).transpose(1, 2), False)
        _store_scales(torch, scales,
                      torch.empty(1, 2, 4, dtype=torch.int32, device=dev).transpose(1, 2), True)
        torch.zeros(2, dtype=torch.int32, device=dev).add_(torch.ones(2, dtype=torch.int32,
                                                                       device=dev))
        b = torch.zeros(2, 8, dtype=torch.bfloat16, device=dev)
        (b.float() + b.float()).to(torch.bfloat16)
    stream.synchronize()
