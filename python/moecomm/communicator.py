"""MoECommunicator and the values its calls return.

Stream rules (see docs/python.md, "Streams"):

* Work is ordered after the caller's current stream (torch: ``torch.cuda.current_stream()``;
  CuPy: ``cupy.cuda.get_current_stream()``) and its outputs are ready on that stream.
* A communicator that is the only rank of its group in this process (process groups, a virtual
  group of one) queues its kernels on the caller's stream itself.
* Co-located virtual ranks spin on each other, so each must run on a stream of its own: by
  default a rank's kernels run on the rank's own stream (``comm.stream``), which first waits for
  the caller's stream. The caller's stream waits for the ranks' kernels once *every* rank of the
  group has made the call (joining earlier would make the caller's stream wait for a kernel that
  waits for a peer whose launch is queued behind that very wait). Hence: issue a collective call
  for all ranks before using any rank's outputs.
* ``stream=`` overrides all of this: the kernels go on that stream (distinct streams for
  co-located ranks), ordered by the caller.
* Frameworks without a stream API (JAX) get outputs that are complete on the host.
"""

from __future__ import annotations

import collections
import operator
import threading
from typing import Any, List, Optional, Sequence

from . import _C
from . import _frameworks
from .config import MoECommunicatorConfig

_SIZINGS = ("exact", "worst_case")


# ---------------------------------------------------------------------------------------------
class _Joiner:
    """Deferred joins of callers' streams with the ranks' streams.

    Every call of a local rank that ran on the rank's own stream leaves one entry (caller's
    stream, completion event, references that must outlive the kernels). Entries are consumed in
    rounds: once every local rank has an entry, the oldest entry of each rank is joined (the
    caller's stream waits for the event, or the host waits where there is no stream)."""

    def __init__(self, num_local: int) -> None:
        self._queues = [collections.deque() for _ in range(num_local)]
        self._lock = threading.Lock()

    def add(self, local_rank: int, caller_stream: Optional[int], event: "_C.CudaEvent",
            refs: Any) -> None:
        with self._lock:
            self._queues[local_rank].append((caller_stream, event, refs))
            ready = []
            while all(self._queues):
                for q in self._queues:
                    ready.append(q.popleft())
        for stream, ev, _refs in ready:
            if stream is None:
                ev.synchronize()
            else:
                ev.stream_wait(stream)

    def pending(self) -> List[int]:
        """Entries waiting per local rank (diagnostics)."""
        with self._lock:
            return [len(q) for q in self._queues]


class _GroupContext:
    """What the communicators of one group in this process share."""

    def __init__(self, cpp_group: Any, num_local: int, devices: Sequence[int]) -> None:
        self.cpp_group = cpp_group  # keeps the C++ group alive (also kept by each rank)
        self.num_local = num_local
        self.devices = list(devices)
        self.joiner = _Joiner(num_local)
        self._executor = None
        self._executor_lock = threading.Lock()

    def executor(self):
        with self._executor_lock:
            if self._executor is None:
                import concurrent.futures

                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.num_local, thread_name_prefix="moecomm-rank")
            return self._executor

    def __del__(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=False)


class _Plan:
    __slots__ = ("direct", "caller", "exec", "fw")

    def __init__(self, direct: bool, caller: Optional[int], exec_stream: int, fw) -> None:
        self.direct = direct
        self.caller = caller
        self.exec = exec_stream
        self.fw = fw


# ---------------------------------------------------------------------------------------------
class Handle:
    """The routing of one dispatch. Pass it to :meth:`MoECommunicator.combine`, or back to
    :meth:`MoECommunicator.dispatch` as ``previous_handle`` (HT: same routing, no layout and no
    count exchange). It keeps its communicator alive."""

    __slots__ = ("_h", "_comm", "_topk_idx", "_fw", "__weakref__")

    def __init__(self, h: "_C.Handle", comm: "MoECommunicator", topk_idx: Any, fw) -> None:
        self._h = h
        self._comm = comm
        self._topk_idx = topk_idx
        self._fw = fw

    @property
    def mode(self) -> str:
        """``"ht"`` or ``"ll"``: the path that produced it."""
        return self._h.mode

    @property
    def num_tokens(self) -> int:
        """Tokens T the dispatching rank passed."""
        return self._h.num_tokens

    @property
    def num_recv_tokens(self) -> int:
        """HT: rows received when known on the host (exact sizing or cached); -1 otherwise."""
        return self._h.num_recv_tokens

    @property
    def communicator(self) -> "MoECommunicator":
        return self._comm

    def __repr__(self) -> str:
        return (f"moecomm.Handle(mode={self.mode!r}, rank={self._comm.rank}, "
                f"num_tokens={self.num_tokens}, num_recv_tokens={self.num_recv_tokens})")


class Event:
    """Completion of an asynchronous call (``async_=True``). Keeps the call's input tensors alive
    until it was waited on."""

    __slots__ = ("_ev", "_fw", "_device", "_refs")

    def __init__(self, ev: Any, fw, device: int, refs: Any) -> None:
        self._ev = ev
        self._fw = fw
        self._device = device
        self._refs = refs

    def wait(self) -> None:
        """Blocks the host until the work is done (raises a pending moecomm.TimeoutError)."""
        self._ev.synchronize()
        self._refs = None

    def current_stream_wait(self) -> None:
        """Makes the current stream of the call's framework (torch: torch.cuda.current_stream())
        wait for the work, without blocking the host. Frameworks without streams wait on the
        host. Virtual ranks: do this once every rank has made the call."""
        s = self._fw.current_stream(self._device) if self._fw.has_streams else None
        if s is None:
            self.wait()
        else:
            self._ev.stream_wait(s)
            self._refs = None

    def stream_wait(self, stream: Any) -> None:
        """Makes ``stream`` (int, torch or CuPy stream) wait for the work."""
        self._ev.stream_wait(_frameworks.stream_ptr(stream))
        self._refs = None

    @property
    def native(self) -> int:
        """The ``cudaEvent_t`` as an int."""
        return self._ev.native


class RecvHook:
    """The receive phase of a low-latency call (``return_recv_hook=True``): between the send
    phase and this call no SMs are held. Call it exactly once, on every rank; the outputs are
    valid afterwards (virtual ranks: once every rank has called its hook)."""

    __slots__ = ("_hook", "_comm", "_plan", "_called")

    def __init__(self, hook: "_C.RecvHook", comm: "MoECommunicator", plan: _Plan) -> None:
        self._hook = hook
        self._comm = comm
        self._plan = plan
        self._called = False

    def __call__(self, stream: Any = None) -> None:
        if self._called:
            raise _C.InvalidArgument("hook: already called; a receive hook runs exactly once")
        self._called = True
        if stream is not None:
            self._hook(_frameworks.stream_ptr(stream))
            return
        self._hook(0)  # the stream of the send phase
        plan = self._plan
        if not plan.direct:
            comm = self._comm
            caller = plan.fw.current_stream(comm.device) if plan.fw.has_streams else None
            ev = _C.CudaEvent(comm.device)
            ev.record(comm.stream)
            comm._ctx.joiner.add(comm._local, caller, ev, None)


class _Outputs:
    """Outputs whose tensors are converted to the caller's framework on first access."""

    _TENSORS: tuple = ()

    def __init__(self, raw: dict, fw, fp8_fields: tuple = ()) -> None:
        self._raw = raw
        self._fw = fw
        self._fp8_fields = fp8_fields

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in type(self)._TENSORS:
            raise AttributeError(name)
        value = self._fw.wrap(self._raw.get(name), fp8=name in self._fp8_fields)
        object.__setattr__(self, name, value)
        return value

    def __repr__(self) -> str:
        shown = []
        for name in type(self)._TENSORS:
            if self._raw.get(name) is not None:
                shape = getattr(getattr(self, name), "shape", None)
                shown.append(f"{name}={tuple(shape)}" if shape is not None else name)
        return f"{type(self).__name__}({', '.join(shown)})"


class DispatchOutput(_Outputs):
    """Outputs of :meth:`MoECommunicator.dispatch`: zero-copy views of the communicator's
    registered buffers, valid until the next dispatch (HT) or the next-but-one (LL), in the
    framework of ``x`` (fp8 as ``torch.float8_e4m3fn`` for torch, uint8 elsewhere).

    HT: ``recv_x [N, H]`` (exact) or ``[capacity, H]`` (worst case), ``recv_x_scales``,
    ``recv_topk_idx [N, K]`` (local expert ids, -1 elsewhere), ``recv_topk_weights``,
    ``recv_src_token [N]``, ``recv_rank_prefix [R+1]``, ``num_recv_tokens_per_expert [L]``,
    ``num_recv_tokens_device [1]``, ``num_recv_tokens`` (host int, -1 in worst case),
    ``num_recv_tokens_per_expert_host`` (list).
    LL: ``recv_x [L, R*M, H]``, ``recv_x_scales``, ``recv_count [L]``, ``recv_src_info [L, R*M]``,
    ``recv_layout [L, R, 2]``.
    Always: ``mode`` ("ht"/"ll"), ``handle``, ``event`` (async), ``hook`` (return_recv_hook).
    """

    _TENSORS = ("recv_x", "recv_x_scales", "recv_topk_idx", "recv_topk_weights",
                "recv_src_token", "recv_rank_prefix", "num_recv_tokens_per_expert",
                "num_recv_tokens_device", "recv_count", "recv_src_info", "recv_layout")

    def __init__(self, raw: dict, fw, fp8: bool, handle: Handle, event: Optional[Event],
                 hook: Optional[RecvHook]) -> None:
        super().__init__(raw, fw, ("recv_x",) if fp8 else ())
        self.mode: str = raw["mode"]
        self.num_recv_tokens: int = raw["num_recv_tokens"]
        self.num_recv_tokens_per_expert_host: List[int] = list(raw["num_recv_tokens_per_expert_host"])
        self.handle = handle
        self.event = event
        self.hook = hook


class CombineOutput(_Outputs):
    """Outputs of :meth:`MoECommunicator.combine`: ``out [T, H]`` bf16 (the caller's ``out``, or a
    view of the communicator's buffer valid until the next combine), ``combined_topk_weights``
    (HT with ``recv_topk_weights``), ``event``, ``hook``."""

    _TENSORS = ("out", "combined_topk_weights")

    def __init__(self, raw: dict, fw, out: Any, event: Optional[Event],
                 hook: Optional[RecvHook]) -> None:
        super().__init__(raw, fw)
        if out is not None:
            object.__setattr__(self, "out", out)
        self.event = event
        self.hook = hook


class Layout(_Outputs):
    """Routing layout of one batch (views valid until the next collective call):
    ``num_tokens_per_rank [R]``, ``num_tokens_per_expert [E]``, ``is_token_in_rank [T, R]`` (uint8),
    ``num_recv_tokens_per_rank [R]``, ``num_recv_tokens_per_expert [L]``, and for a group that
    spans nodes ``num_tokens_per_node [N]`` (distinct tokens bound for each node; None on one
    node)."""

    _TENSORS = ("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank",
                "num_recv_tokens_per_rank", "num_recv_tokens_per_expert", "num_tokens_per_node")


# ---------------------------------------------------------------------------------------------
class MoECommunicator:
    """One rank's endpoint (``moecomm::MoECommunicator``). Made by :func:`moecomm.virtual_group`
    or :func:`moecomm.process_group_communicator`, never directly.

    All calls but the accessors are collective: every rank of the group makes the same sequence
    of calls. One rank is not thread-safe; distinct ranks may be driven from distinct threads
    (:meth:`moecomm.VirtualGroup.parallel`)."""

    def __init__(self, cpp_comm: "_C.Communicator", ctx: _GroupContext, local_index: int) -> None:
        self._c = cpp_comm
        self._ctx = ctx
        self._local = local_index
        self.rank: int = cpp_comm.rank
        self.num_ranks: int = cpp_comm.num_ranks
        self.device: int = cpp_comm.device
        #: This rank's own CUDA stream (``cudaStream_t`` as an int).
        self.stream: int = cpp_comm.stream
        self._config = None

    @property
    def config(self) -> MoECommunicatorConfig:
        if self._config is None:
            self._config = MoECommunicatorConfig._from_cpp(self._c.config)
        return self._config

    @property
    def num_nodes(self) -> int:
        """Nodes the group spans (1 within one node); rank r is on node
        ``r // (num_ranks // num_nodes)``."""
        return self._c.num_nodes

    @property
    def local_experts(self) -> int:
        return self.config.num_experts // self.num_ranks

    def __repr__(self) -> str:
        return (f"moecomm.MoECommunicator(rank={self.rank}, num_ranks={self.num_ranks}, "
                f"device={self.device}, mode={self.config.mode!r})")

    # -- stream ordering ----------------------------------------------------------------------
    def _plan(self, fw, stream: Any) -> _Plan:
        if stream is not None:
            s = _frameworks.stream_ptr(stream)
            return _Plan(True, s, s, fw)
        caller = fw.current_stream(self.device) if fw.has_streams else None
        # 0, 1, 2: the legacy and per-thread default streams, which the library refuses.
        if caller is not None and caller not in (0, 1, 2) and self._ctx.num_local == 1:
            return _Plan(True, caller, caller, fw)
        if caller is not None:
            _C.stream_wait_stream(self.stream, caller, self.device)  # fork
        return _Plan(False, caller, self.stream, fw)

    def _finish(self, plan: _Plan, refs: Any, async_: bool, cpp_event: Any) -> Optional[Event]:
        if plan.direct:
            return Event(cpp_event, plan.fw, self.device, refs) if async_ else None
        ev = _C.CudaEvent(self.device)
        ev.record(self.stream)
        if async_:
            return Event(ev, plan.fw, self.device, refs)
        self._ctx.joiner.add(self._local, plan.caller, ev, refs)
        return None

    # -- collective calls ---------------------------------------------------------------------
    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any = None, *, x_scales: Any = None,
                 quantize_fp8: bool = False, sizing: str = "exact",
                 previous_handle: Optional[Handle] = None, async_: bool = False,
                 return_recv_hook: bool = False, stream: Any = None):
        """Sends each token to the ranks that hold its experts.

        ``x``: bf16 ``[T, H]``, or fp8 e4m3 ``[T, H]`` (torch.float8_e4m3fn, or uint8 bytes) with
        ``x_scales`` f32 ``[T, H/128]``. ``topk_idx``: int64/int32 ``[T, K]``, -1 for none.
        ``topk_weights``: f32 ``[T, K]`` (optional). ``quantize_fp8``: quantise bf16 x on the way.
        ``sizing`` (HT): ``"exact"`` (the host waits for the counts: drive co-located virtual
        ranks from :meth:`VirtualGroup.parallel`) or ``"worst_case"`` (no host wait; outputs
        have the receive capacity rows). ``previous_handle`` (HT): reuse that routing.
        ``async_``: the returned ``DispatchOutput.event`` marks completion and the caller's
        stream is not made to wait. ``return_recv_hook`` (LL): return after the send phase;
        ``DispatchOutput.hook()`` runs the receive phase.

        Returns ``(DispatchOutput, Handle)``.
        """
        fw = _frameworks.of(x)
        if sizing not in _SIZINGS:
            raise _C.InvalidArgument(f"sizing: expected 'exact' or 'worst_case', got {sizing!r}")
        if previous_handle is not None:
            self._check_handle(previous_handle, "previous_handle")
        fp8 = bool(quantize_fp8) or (x is not None and fw.is_fp8(x))
        fw.prepare((x, x_scales, topk_idx, topk_weights))
        plan = self._plan(fw, stream)
        raw = self._c.dispatch(
            fw.export(x), fw.export(x_scales), fw.export(topk_idx), fw.export(topk_weights),
            quantize_fp8=bool(quantize_fp8), worst_case=sizing == "worst_case",
            previous_handle=previous_handle._h if previous_handle is not None else None,
            stream=plan.exec, async_=bool(async_) and plan.direct,
            return_recv_hook=bool(return_recv_hook), bf16_as_u16=fw.bf16_as_u16)
        event = self._finish(plan, (x, x_scales, topk_idx, topk_weights), async_, raw["event"])
        handle = Handle(raw["handle"], self, topk_idx, fw)
        hook = RecvHook(raw["hook"], self, plan) if raw["hook"] is not None else None
        return DispatchOutput(raw, fw, fp8, handle, event, hook), handle

    def combine(self, y: Any, handle: Handle, *, topk_weights: Any = None,
                recv_topk_weights: Any = None, bias: Any = None, out: Any = None,
                async_: bool = False, return_recv_hook: bool = False,
                stream: Any = None) -> CombineOutput:
        """Brings the experts' outputs back to their tokens (the transpose of dispatch).

        HT: ``y`` bf16 ``[N, H]`` (one row per received row, already reduced over the local
        experts); optional ``recv_topk_weights`` f32 ``[N, K]`` (their sum per token comes back
        as ``combined_topk_weights``) and ``bias`` bf16 ``[T, H]``.
        LL: ``y`` bf16 ``[L, R*M, H]`` (or :meth:`combine_buffer`), ``topk_weights`` f32 ``[T, K]``.
        ``out``: optional caller-owned bf16 ``[T, H]``; else the result is a view of the
        communicator's buffer, valid until the next combine.
        """
        self._check_handle(handle, "handle")
        fw = _frameworks.of(y)
        fw.prepare((y, topk_weights, recv_topk_weights, bias, out))
        plan = self._plan(fw, stream)
        raw = self._c.combine(
            fw.export(y), handle._h, fw.export(topk_weights), fw.export(recv_topk_weights),
            fw.export(bias), fw.export(out), stream=plan.exec,
            async_=bool(async_) and plan.direct, return_recv_hook=bool(return_recv_hook),
            bf16_as_u16=fw.bf16_as_u16)
        event = self._finish(plan, (y, topk_weights, recv_topk_weights, bias, out, handle),
                             async_, raw["event"])
        hook = RecvHook(raw["hook"], self, plan) if raw["hook"] is not None else None
        return CombineOutput(raw, fw, out, event, hook)

    def get_layout(self, topk_idx: Any, *, stream: Any = None) -> Layout:
        """Routing layout of ``topk_idx`` and the count exchange with every peer (collective).
        The returned views are valid until the next collective call."""
        fw = _frameworks.of(topk_idx)
        fw.prepare((topk_idx,))
        plan = self._plan(fw, stream)
        raw = self._c.get_layout(fw.export(topk_idx), stream=plan.exec)
        self._finish(plan, (topk_idx,), False, None)
        return Layout(raw, fw)

    def combine_buffer(self, handle: Handle) -> Any:
        """LL: the registered buffer bf16 ``[L, R*M, H]`` that combine reads for ``handle``. An
        expert MLP that writes its output here saves a copy (zero-copy combine: pass it as y)."""
        self._check_handle(handle, "handle")
        fw = handle._fw
        return fw.wrap(self._c.combine_buffer(handle._h, bf16_as_u16=fw.bf16_as_u16))

    # -- misc ---------------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Waits for this rank's streams and raises any recorded device error (stall, overflow,
        bad topk_idx)."""
        self._c.synchronize()

    def check_errors(self) -> None:
        """Raises any device error recorded so far without waiting."""
        self._c.check_errors()

    def mask_rank(self, rank: int, masked: bool = True) -> None:
        """Masks (or unmasks) ``rank`` for this rank's calls from the next one on: nothing is sent
        to it or awaited from it, and its experts contribute zero. High-throughput calls need every
        live rank to mask the same ranks. See docs/api.md, "Masked ranks"."""
        self._c.mask_rank(operator.index(rank), bool(masked))

    def masked_ranks(self) -> list:
        """Ranks masked now: by :meth:`mask_rank`, or by a low-latency wait that timed out under
        ``Config.mask_unresponsive_ranks`` (complete after :meth:`synchronize`)."""
        return list(self._c.masked_ranks())

    def clear_rank_masks(self) -> None:
        """Unmasks every rank from the next call on."""
        self._c.clear_rank_masks()

    def _check_handle(self, handle: Any, name: str) -> None:
        if not isinstance(handle, Handle):
            raise _C.InvalidArgument(
                f"{name}: expected a moecomm.Handle (from dispatch), got {type(handle).__name__}")
        if handle._comm is not self:
            raise _C.InvalidArgument(
                f"{name}: it was made by another communicator (rank {handle._comm.rank}); pass "
                f"rank {self.rank}'s own dispatch handle")
