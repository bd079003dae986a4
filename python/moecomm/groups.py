"""Groups: who the ranks are (virtual ranks in this process, or one process per rank)."""

from __future__ import annotations

import contextlib
import operator
import sys
from typing import Any, Callable, List, Optional, Sequence, Union

from . import _C
from . import _frameworks
from .communicator import MoECommunicator, _GroupContext
from .config import MoECommunicatorConfig

# Whether CUDA_DEVICE_MAX_CONNECTIONS came from the user, and whether torch had already created
# its CUDA context when moecomm was imported (then the variable came too late for that context).
_queues_env_from_user: bool = True
_cuda_started_before_import: bool = False


def _note_import_state(env_from_user: bool) -> None:
    global _queues_env_from_user, _cuda_started_before_import
    _queues_env_from_user = env_from_user
    torch = _frameworks.torch_loaded()
    try:
        _cuda_started_before_import = bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # pragma: no cover - a torch without CUDA
        _cuda_started_before_import = False


def _check_hardware_queues(ranks_per_device: int) -> None:
    # CUDA's default of 8 hardware queues serves at most 4 co-located ranks (2 streams each).
    if ranks_per_device > 4 and _cuda_started_before_import and not _queues_env_from_user:
        raise _C.InvalidArgument(
            f"CUDA_DEVICE_MAX_CONNECTIONS: torch started CUDA before moecomm was imported, so the "
            f"context has CUDA's default 8 hardware queues; {ranks_per_device} co-located "
            f"virtual ranks need {2 * ranks_per_device}. Import moecomm before the first CUDA "
            f"call, or export CUDA_DEVICE_MAX_CONNECTIONS=32 before starting Python")


def _as_config(config: Any) -> MoECommunicatorConfig:
    if isinstance(config, MoECommunicatorConfig):
        return config
    if isinstance(config, dict):
        return MoECommunicatorConfig(**config)
    raise _C.InvalidArgument(
        f"config: expected a moecomm.MoECommunicatorConfig (or a dict of its fields), got "
        f"{type(config).__name__}")


# ---------------------------------------------------------------------------------------------
class VirtualGroup(list):
    """The R communicators of one ``moecomm::VirtualGroup`` (a list, rank order).

    Each communicator keeps the group alive. Calls that never wait on the host (LL, worst-case
    or cached HT dispatch, combine, get_layout) may be issued rank after rank from one thread;
    exact HT dispatch waits on the host for the counts, which needs every rank in flight at once:
    run it through :meth:`parallel`.
    """

    def __init__(self, comms: List[MoECommunicator], ctx: _GroupContext) -> None:
        super().__init__(comms)
        self._ctx = ctx

    @property
    def size(self) -> int:
        return len(self)

    @property
    def devices(self) -> List[int]:
        return list(self._ctx.devices)

    @property
    def num_nodes(self) -> int:
        """Virtual nodes of the group (1 unless declared with ``nodes=``)."""
        return self._ctx.cpp_group.num_nodes

    def parallel(self, fn: Callable[[int], Any]) -> List[Any]:
        """Runs ``fn(rank)`` for every rank, each on its own host thread (persistent, one per
        rank), and returns the results in rank order; re-raises the first exception (by rank).

        The threads inherit the caller's torch current streams and grad mode (and CuPy current
        stream), so work they queue is ordered like the caller's.
        """
        return _run_per_rank(self._ctx.executor(), self._ctx.devices, fn, len(self))

    def synchronize(self) -> None:
        """Waits for every rank's streams; raises the first device error."""
        self._ctx.cpp_group.synchronize()

    def __repr__(self) -> str:
        nodes = self.num_nodes
        return (f"moecomm.VirtualGroup(size={len(self)}, devices={self._ctx.devices}"
                + (f", nodes={nodes})" if nodes > 1 else ")"))


def _run_per_rank(executor, devices: Sequence[int], fn: Callable[[int], Any], n: int) -> List[Any]:
    """``fn(rank)`` for ranks 0..n-1 on `executor`'s threads (rank r on devices[r % len]), each
    thread inheriting the caller's current streams and grad mode; results in rank order, and the
    first exception (by rank) re-raised once every rank has finished."""
    state = _ThreadState.capture(list(devices))
    futures = [executor.submit(state.run, devices[r % len(devices)], fn, r) for r in range(n)]
    results, first = [], None
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            if first is None:
                first = e
            results.append(None)
    if first is not None:
        raise first
    return results


class _ThreadState:
    """The calling thread's framework state, re-established in a worker thread."""

    def __init__(self) -> None:
        self.torch = None
        self.torch_streams = {}
        self.grad_enabled = True
        self.cupy = None
        self.cupy_streams = {}

    @classmethod
    def capture(cls, devices: Sequence[int]) -> "_ThreadState":
        st = cls()
        torch = _frameworks.torch_loaded()
        if torch is not None:
            st.torch = torch
            st.grad_enabled = torch.is_grad_enabled()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for d in set(devices):
                    st.torch_streams[d] = torch.cuda.current_stream(d)
        cupy = sys.modules.get("cupy")
        if cupy is not None:
            try:
                for d in set(devices):
                    with cupy.cuda.Device(d):
                        st.cupy_streams[d] = cupy.cuda.get_current_stream()
                st.cupy = cupy
            except Exception:  # pragma: no cover - CuPy without a device
                st.cupy = None
        return st

    def run(self, device: int, fn: Callable[[int], Any], rank: int) -> Any:
        with contextlib.ExitStack() as stack:
            if self.torch is not None:
                stack.enter_context(self.torch.set_grad_enabled(self.grad_enabled))
                s = self.torch_streams.get(device)
                if s is not None:
                    stack.enter_context(self.torch.cuda.device(device))
                    stack.enter_context(self.torch.cuda.stream(s))
            if self.cupy is not None and device in self.cupy_streams:
                stack.enter_context(self.cupy.cuda.Device(device))
                stack.enter_context(self.cupy_streams[device])
            return fn(rank)


def virtual_group(num_ranks: int, config: Union[MoECommunicatorConfig, dict],
                  device: Union[int, Sequence[int]] = 0, *, nodes: int = 1) -> VirtualGroup:
    """``num_ranks`` ranks in this process: rank r lives on ``device`` (or on
    ``device[r % len(device)]`` for a list), each with its own stream and ``config.num_sms`` SMs.
    Every kernel runs for real; this is how one GPU holds a whole expert-parallel group.

    ``nodes`` > 1 declares virtual nodes: ranks ``n*G .. n*G+G-1`` (``G = num_ranks // nodes``)
    form node n, and ranks of different nodes reach each other only through the (loopback) RDMA
    engine, as on a cluster. It needs ``config.rdma_bytes >= moecomm.required_rdma_bytes(config,
    num_ranks, nodes)``.

    Raises moecomm.InvalidArgument for a config that does not fit (e.g. num_experts not a
    multiple of num_ranks, or num_ranks * num_sms above the device's SMs, ``nodes`` not dividing
    num_ranks, or ``rdma_bytes`` too small for the nodes: the message names the size needed) and
    moecomm.Unsupported without a CUDA device."""
    cfg = _as_config(config)
    num_ranks = operator.index(num_ranks)
    nodes = operator.index(nodes)
    devices = [operator.index(device)] if not isinstance(device, (list, tuple)) else [
        operator.index(d) for d in device]
    cfg.validate(num_ranks)
    if devices:
        per_device = max(sum(1 for r in range(num_ranks) if devices[r % len(devices)] == d)
                         for d in set(devices))
        _check_hardware_queues(per_device)
    g = _C.VirtualGroup(cfg._to_cpp(), num_ranks, devices, nodes)
    ctx = _GroupContext(g, num_ranks, devices)
    comms = [MoECommunicator(g.comm(r), ctx, r) for r in range(num_ranks)]
    return VirtualGroup(comms, ctx)


# ---------------------------------------------------------------------------------------------
def process_group_communicator(config: Union[MoECommunicatorConfig, dict], group: Any = None,
                               *, device: Optional[int] = None,
                               host_id: Optional[str] = None) -> MoECommunicator:
    """This process's rank of a group whose ranks are processes, bootstrapped over a
    ``torch.distributed`` process group (``group=None``: the default group). Collective: every
    rank of ``group`` calls it. Peers' buffers are mapped with CUDA IPC.

    ``device``: the CUDA device of this rank (default: ``torch.cuda.current_device()``). The
    handles travel through ``all_gather_object``, so any backend works (gloo included).

    Nodes come from the host: ranks that report the same ``host_id`` (default: the host name)
    form a node; each node must be a contiguous block of ranks, all of one size (else
    moecomm.InvalidArgument naming the hosts and ranks). Pass ``host_id`` to override it, e.g.
    ``host_id=f"node{rank // 2}"`` declares processes of one machine as nodes in tests. A group
    of several nodes needs ``config.rdma_bytes >= moecomm.required_rdma_bytes(config, size,
    nodes)``; the communicator's ``num_nodes`` says how many it found."""
    import torch
    import torch.distributed as dist

    cfg = _as_config(config)
    if not dist.is_available() or not dist.is_initialized():
        raise _C.InvalidArgument(
            "group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() on every rank first")
    rank = dist.get_rank(group)
    size = dist.get_world_size(group)
    if device is None:
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0

    builder, mine, failure = None, None, None
    try:
        builder = _C.ProcessGroupBuilder(cfg._to_cpp(), rank, size, int(device))
        if host_id is not None:
            if not isinstance(host_id, str):
                raise _C.InvalidArgument(
                    f"host_id: expected a str, got {type(host_id).__name__}")
            builder.host_id = host_id
        mine = builder.local_handle()
    except _C.Error as e:
        failure = e
    # Every rank learns whether every rank succeeded, so that none is left waiting.
    gathered: List[Any] = [None] * size
    dist.all_gather_object(gathered, mine if failure is None else ("error", type(failure).__name__,
                                                                  str(failure)), group=group)
    for peer, item in enumerate(gathered):
        if not isinstance(item, bytes):
            if failure is not None:
                raise failure
            kind = item[1] if isinstance(item, tuple) else "Error"
            message = item[2] if isinstance(item, tuple) else repr(item)
            cls = getattr(_C, kind, _C.Error)
            raise cls(f"process_group_communicator: rank {peer} failed: {message}")
    size_each = _C.ProcessGroupBuilder.handle_size()
    for peer, item in enumerate(gathered):
        if len(item) != size_each:
            raise _C.InvalidArgument(
                f"process_group_communicator: rank {peer} sent a {len(item)}-byte handle, "
                f"expected {size_each} (is another moecomm version loaded there?)")
    # connect() compares every rank's library version and config (a digest in each handle) and
    # raises the same InvalidArgument on every rank if they differ, so no rank is left waiting.
    comm_c = builder.connect(b"".join(gathered))
    # Every rank has mapped every peer before any rank's first collective call.
    dist.barrier(group=group)
    ctx = _GroupContext(None, 1, [int(device)])
    ctx.builder = builder
    return MoECommunicator(comm_c, ctx, 0)
