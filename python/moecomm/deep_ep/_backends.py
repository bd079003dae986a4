"""Who the ranks of a deep_ep Buffer are, and how its moecomm communicators are made.

A DeepEP Buffer learns the MoE shape (experts, hidden size, top-k, token counts) only from its
calls, while a moecomm communicator is built for one shape. So a Buffer builds communicators on
first use, one per shape, through a backend:

* ``ProcessGroupBackend``: one rank per process over a ``torch.distributed`` group (any backend);
  a communicator is built collectively (``moecomm.process_group_communicator``) by the first call
  that needs it, which every rank makes with the same shape.
* ``VirtualBackend``: rank r of a group of virtual ranks in this process; the ranks' Buffers share
  one ``VirtualShared``, and the first rank that needs a shape builds the whole
  ``moecomm.virtual_group`` for it (the others find it built).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import socket
import threading
from typing import Any, Callable, Dict, List, Optional

from .. import _C
from ..config import MoECommunicatorConfig


def config_key(cfg: MoECommunicatorConfig) -> tuple:
    return dataclasses.astuple(cfg)


class ProcessGroupBackend:
    """This process's rank of a torch.distributed group."""

    virtual = False

    def __init__(self, group: Any, device: int) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise _C.InvalidArgument(
                "group: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() on every rank first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.num_ranks = dist.get_world_size(self.group)
        self.device = device
        # The ranks of one host form a node (moecomm's communicators find the same from their
        # handles): learn the hosts (a collective, like DeepEP's own exchange of handles at
        # construction). The layout rules (contiguous, equal nodes) are checked by connect().
        hosts: List[Any] = [None] * self.num_ranks
        dist.all_gather_object(hosts, socket.gethostname(), group=self.group)
        self.hosts = hosts
        self.num_nodes = len(set(hosts))
        self._comms: Dict[tuple, Any] = {}

    def communicator(self, cfg: MoECommunicatorConfig):
        """The communicator for ``cfg`` (collective the first time)."""
        from ..groups import process_group_communicator

        key = config_key(cfg)
        comm = self._comms.get(key)
        if comm is None:
            comm = process_group_communicator(cfg, self.group, device=self.device)
            self._comms[key] = comm
        return comm

    def forget(self, cfg: MoECommunicatorConfig) -> None:
        """Drops the cached communicator of ``cfg`` (its handles keep it alive while needed)."""
        self._comms.pop(config_key(cfg), None)

    def agree_max(self, value: int) -> int:
        """The largest ``value`` over the ranks (a host all-reduce over the group)."""
        import torch
        import torch.distributed as dist

        backend = str(dist.get_backend(self.group))
        on_gpu = "nccl" in backend and "gloo" not in backend
        t = torch.tensor([int(value)], dtype=torch.int64,
                         device=torch.device("cuda", self.device) if on_gpu else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def release(self) -> None:
        self._comms.clear()


class VirtualShared:
    """What the Buffers of one group of virtual ranks share: the groups built so far (one per
    shape), the device, and the host threads of ``BufferGroup.parallel``."""

    def __init__(self, num_ranks: int, device: int, num_nodes: int = 1) -> None:
        self.num_ranks = num_ranks
        self.device = device
        self.num_nodes = num_nodes
        self.lock = threading.Lock()
        self.groups: Dict[tuple, Any] = {}
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    def group(self, cfg: MoECommunicatorConfig):
        from ..groups import virtual_group

        key = config_key(cfg)
        with self.lock:
            g = self.groups.get(key)
            if g is None:
                g = virtual_group(self.num_ranks, cfg, self.device, nodes=self.num_nodes)
                self.groups[key] = g
            return g

    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self.lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.num_ranks, thread_name_prefix="moecomm-deep_ep-rank")
            return self._executor

    def parallel(self, fn: Callable[[int], Any]) -> List[Any]:
        """``fn(rank)`` for every rank on its own host thread, the threads inheriting the
        caller's torch streams and grad mode; results in rank order, first exception re-raised."""
        from ..groups import _run_per_rank

        return _run_per_rank(self.executor(), [self.device], fn, self.num_ranks)

    def synchronize(self) -> None:
        with self.lock:
            groups = list(self.groups.values())
        for g in groups:
            g.synchronize()


class VirtualBackend:
    """Rank ``rank`` of a group of virtual ranks (see :class:`VirtualShared`)."""

    virtual = True

    def __init__(self, shared: VirtualShared, rank: int) -> None:
        self.shared = shared
        self.rank = rank
        self.num_ranks = shared.num_ranks
        self.device = shared.device
        self.num_nodes = shared.num_nodes

    def communicator(self, cfg: MoECommunicatorConfig):
        return self.shared.group(cfg)[self.rank]

    def forget(self, cfg: MoECommunicatorConfig) -> None:
        pass  # the group is shared by every rank's Buffer

    def agree_max(self, value: int) -> int:
        # Virtual ranks may be driven one after another from one thread, where no rank can wait
        # for the others on the host: their capacity is fixed when the Buffers are made.
        raise _C.InvalidArgument(
            "max_tokens_per_rank: virtual ranks need a fixed HT capacity "
            "(moecomm.deep_ep.virtual_buffers(..., max_tokens_per_rank=...))")

    def release(self) -> None:
        pass
