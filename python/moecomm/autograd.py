"""Autograd for the high-throughput path, so that an MoE layer trains (needs torch).

* :func:`dispatch`'s backward is a combine of the gradient of ``recv_x``: each token's gradient
  is the sum of its rows' gradients over the ranks it went to (the gradient of
  ``recv_topk_weights`` comes back the same way, through ``combined_topk_weights``).
* :func:`combine`'s backward is a cached dispatch (``previous_handle``) of the output gradient.

Both are collective in both directions: every rank runs its backward together with the others.
With virtual ranks, pass the whole group (lists, one entry per rank): the forward issues every
rank's call (exact dispatch through the group's threads) and the backward, run by one autograd
node, issues every rank's combine or cached dispatch rank after rank from the autograd thread,
which works because neither waits on the host. With one process per rank, pass the process's
communicator and tensors; every process runs ``backward()`` on its loss.

Outputs are tensors of their own (the communicator's zero-copy buffers are copied once), so
autograd may keep them across later calls. The LL path has no backward (use ``mode="ht"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Union

import torch

from . import _C
from .communicator import Handle, MoECommunicator

__all__ = ["DispatchResult", "HTCombine", "HTDispatch", "combine", "dispatch"]


@dataclasses.dataclass
class DispatchResult:
    """One rank's differentiable dispatch output (tensors owned by the caller)."""

    recv_x: torch.Tensor                       #: [N, H] bf16, differentiable
    recv_topk_idx: torch.Tensor                #: [N, K] int64 local expert ids, -1 elsewhere
    recv_topk_weights: Optional[torch.Tensor]  #: [N, K] f32, differentiable (if weights given)
    recv_src_token: torch.Tensor               #: [N] int32 source token of each row
    num_recv_tokens_per_expert: torch.Tensor   #: [L] int32 on the device (padded)
    num_recv_tokens_per_expert_host: List[int]  #: the same on the host (exact sizing), else []
    num_recv_tokens: int                       #: N on the host (exact sizing), else -1
    num_recv_tokens_device: torch.Tensor       #: [1] int32: N on the device (any sizing)
    handle: Handle                             #: for combine


class _Meta:
    """Non-tensor arguments of the autograd functions (one per call)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def _group_lists(comms: Any, *per_rank: Any):
    """(comms list, single?, per-rank lists)."""
    if isinstance(comms, MoECommunicator):
        return [comms], True, [[v] for v in per_rank]
    comms = list(comms)
    if not comms or not all(isinstance(c, MoECommunicator) for c in comms):
        raise _C.InvalidArgument(
            "comms: expected a moecomm.MoECommunicator or a list of them (a VirtualGroup)")
    lists = []
    for v in per_rank:
        if v is None:
            lists.append([None] * len(comms))
            continue
        v = list(v)
        if len(v) != len(comms):
            raise _C.InvalidArgument(
                f"expected one tensor per communicator ({len(comms)}), got {len(v)}")
        lists.append(v)
    return comms, False, lists


def _check_whole_group(comms: List[MoECommunicator], what: str) -> None:
    ctx = comms[0]._ctx
    if any(c._ctx is not ctx for c in comms):
        raise _C.InvalidArgument(f"comms: {what}: expected communicators of one group")
    if len(comms) != ctx.num_local or sorted(c._local for c in comms) != list(range(ctx.num_local)):
        raise _C.InvalidArgument(
            f"comms: {what}: expected all {ctx.num_local} ranks of the group in this process "
            f"(every rank's call is issued together), got {len(comms)}")


def _run_ranks(comms: List[MoECommunicator], fn, threads: bool) -> list:
    if threads and len(comms) > 1:
        from .groups import _ThreadState

        ctx = comms[0]._ctx
        state = _ThreadState.capture(ctx.devices)
        ex = ctx.executor()
        futures = [ex.submit(state.run, c.device, fn, i) for i, c in enumerate(comms)]
        results, first = [], None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - re-raised below
                first = first or e
                results.append(None)
        if first is not None:
            raise first
        return results
    return [fn(i) for i in range(len(comms))]


# ---------------------------------------------------------------------------------------------
class HTDispatch(torch.autograd.Function):
    """HT dispatch of every local rank; backward = combine of the gradients."""

    @staticmethod
    def forward(ctx, meta: _Meta, *tensors: torch.Tensor):
        comms = meta.comms
        R = len(comms)
        xs = tensors[:R]
        ws = tensors[R:2 * R] if meta.has_w else [None] * R
        for x in xs:
            if x.dtype != torch.bfloat16:
                raise _C.InvalidArgument(
                    f"x: expected bf16 for a differentiable dispatch (fp8 is not differentiable; "
                    f"dispatch fp8 with MoECommunicator.dispatch), got {x.dtype}")

        def one(i: int):
            return comms[i].dispatch(xs[i], meta.topk_idx[i], ws[i], sizing=meta.sizing)

        results = _run_ranks(comms, one, threads=meta.sizing == "exact")
        # Every rank has made the call: the outputs are ready on this stream. Copy them out of
        # the communicator's buffers (the next dispatch reuses them).
        recv_x, recv_w, recv_idx, infos = [], [], [], []
        for out, handle in results:
            if out.mode != "ht":
                raise _C.InvalidArgument(
                    "autograd.dispatch: the call took the low-latency path, which has no backward; "
                    "use MoECommunicatorConfig(mode='ht') for training")
            recv_x.append(out.recv_x.clone())
            recv_idx.append(out.recv_topk_idx.clone())
            if meta.has_w:
                recv_w.append(out.recv_topk_weights.clone())
            infos.append(DispatchResult(
                recv_x=None, recv_topk_idx=None, recv_topk_weights=None,
                recv_src_token=out.recv_src_token.clone(),
                num_recv_tokens_per_expert=out.num_recv_tokens_per_expert.clone(),
                num_recv_tokens_per_expert_host=out.num_recv_tokens_per_expert_host,
                num_recv_tokens=out.num_recv_tokens,
                num_recv_tokens_device=out.num_recv_tokens_device.clone(), handle=handle))
        meta.infos = infos
        ctx.meta = meta
        ctx.handles = [i.handle for i in infos]
        ctx.token_shapes = [(x.shape[0], x.shape[1], x.device) for x in xs]
        ctx.recv_shapes = [(t.shape, t.device) for t in recv_x]
        ctx.mark_non_differentiable(*recv_idx)
        if meta.has_w:
            ctx.save_for_backward(*recv_idx)
        return tuple(recv_x + recv_w + recv_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        meta = ctx.meta
        comms = meta.comms
        R = len(comms)
        gx = grads[:R]
        gw = grads[R:2 * R] if meta.has_w else [None] * R
        recv_idx = ctx.saved_tensors if meta.has_w else [None] * R
        issued = []
        for i, comm in enumerate(comms):
            (shape, device) = ctx.recv_shapes[i]
            g = gx[i]
            if g is None:
                g = torch.zeros(shape, dtype=torch.bfloat16, device=device)
            g = g.to(torch.bfloat16).contiguous()
            rw = None
            if meta.has_w:
                w = gw[i]
                if w is None:
                    w = torch.zeros(recv_idx[i].shape, dtype=torch.float32, device=device)
                # recv_topk_weights is 0 (a constant) where the expert is remote.
                rw = torch.where(recv_idx[i] >= 0, w.float(), torch.zeros((), device=device)).contiguous()
            T, H, xdev = ctx.token_shapes[i]
            out = torch.empty((T, H), dtype=torch.bfloat16, device=xdev)
            res = comm.combine(g, ctx.handles[i], recv_topk_weights=rw, out=out)
            issued.append((out, res))
        grad_x = [out for out, _ in issued]
        grad_w = [res.combined_topk_weights.clone() for _, res in issued] if meta.has_w else []
        return (None, *grad_x, *grad_w)


class HTCombine(torch.autograd.Function):
    """HT combine of every local rank; backward = cached dispatch of the output gradients."""

    @staticmethod
    def forward(ctx, meta: _Meta, *tensors: torch.Tensor):
        comms = meta.comms
        R = len(comms)
        ys = tensors[:R]
        biases = tensors[R:2 * R] if meta.has_bias else [None] * R
        outs = []
        for i, comm in enumerate(comms):
            h = meta.handles[i]
            y = ys[i].to(torch.bfloat16).contiguous()
            b = biases[i].to(torch.bfloat16).contiguous() if biases[i] is not None else None
            out = torch.empty((h.num_tokens, y.shape[1]), dtype=torch.bfloat16, device=y.device)
            comm.combine(y, h, bias=b, out=out)
            outs.append(out)
        ctx.meta = meta
        ctx.y_info = [(y.shape[0], y.dtype) for y in ys]
        ctx.bias_dtypes = [b.dtype if b is not None else None for b in biases]
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        meta = ctx.meta
        comms = meta.comms
        issued = []
        for i, comm in enumerate(comms):
            h = meta.handles[i]
            g = grads[i]
            if g is None:
                g = torch.zeros((h.num_tokens, comm.config.hidden), dtype=torch.bfloat16,
                                device=torch.device("cuda", comm.device))
            g = g.to(torch.bfloat16).contiguous()
            out, _ = comm.dispatch(g, h._topk_idx, previous_handle=h)
            issued.append((g, out))
        grad_y = []
        for i, (g, out) in enumerate(issued):
            rows, dtype = ctx.y_info[i]
            grad_y.append(out.recv_x[:rows].to(dtype, copy=True))
        grad_b = []
        if meta.has_bias:
            grad_b = [g.to(dt) for (g, _), dt in zip(issued, ctx.bias_dtypes)]
        return (None, *grad_y, *grad_b)


# ---------------------------------------------------------------------------------------------
def dispatch(comms: Union[MoECommunicator, Sequence[MoECommunicator]], x, topk_idx,
             topk_weights=None, *, sizing: str = "exact"):
    """Differentiable HT dispatch.

    ``comms``: one communicator (one process per rank) with tensors, or every rank of a
    virtual group (e.g. the :class:`moecomm.VirtualGroup` itself) with one tensor per rank.
    ``x``: bf16 ``[T, H]``; ``topk_idx``: int64/int32 ``[T, K]``; ``topk_weights``: f32
    ``[T, K]`` (optional; its gradient flows back through ``recv_topk_weights``).
    Exact sizing of co-located virtual ranks runs every rank on the group's threads.

    Returns a :class:`DispatchResult` (or a list, one per rank).
    """
    comm_list, single, (xs, idxs, ws) = _group_lists(comms, x, topk_idx, topk_weights)
    if sizing not in ("exact", "worst_case"):
        raise _C.InvalidArgument(f"sizing: expected 'exact' or 'worst_case', got {sizing!r}")
    _check_whole_group(comm_list, "autograd.dispatch")
    has_w = ws[0] is not None
    if any((w is None) != (not has_w) for w in ws):
        raise _C.InvalidArgument("topk_weights: expected a tensor for every rank or for none")
    meta = _Meta(comms=comm_list, topk_idx=idxs, sizing=sizing, has_w=has_w)
    outs = HTDispatch.apply(meta, *xs, *(ws if has_w else []))
    R = len(comm_list)
    recv_x = outs[:R]
    recv_w = outs[R:2 * R] if has_w else [None] * R
    recv_idx = outs[2 * R:] if has_w else outs[R:]
    results = []
    for i, info in enumerate(meta.infos):
        results.append(dataclasses.replace(info, recv_x=recv_x[i], recv_topk_idx=recv_idx[i],
                                           recv_topk_weights=recv_w[i]))
    return results[0] if single else results


def combine(comms: Union[MoECommunicator, Sequence[MoECommunicator]], y, handle, *,
            bias=None):
    """Differentiable HT combine: ``out[t] = sum over the token's ranks of y`` (+ bias), bf16.

    ``y``: ``[N, H]`` (any float dtype; sent as bf16, its gradient comes back in its dtype), one
    row per received row, already reduced over the rank's experts. ``handle``: from
    :func:`dispatch`. Same grouping rules as :func:`dispatch`.
    """
    comm_list, single, (ys, handles, biases) = _group_lists(comms, y, handle, bias)
    _check_whole_group(comm_list, "autograd.combine")
    for i, h in enumerate(handles):
        comm_list[i]._check_handle(h, "handle")
        if h.mode != "ht":
            raise _C.InvalidArgument("handle: expected a high-throughput handle (LL has no backward)")
    has_bias = biases[0] is not None
    if any((b is None) != (not has_bias) for b in biases):
        raise _C.InvalidArgument("bias: expected a tensor for every rank or for none")
    meta = _Meta(comms=comm_list, handles=handles, has_bias=has_bias)
    outs = HTCombine.apply(meta, *ys, *(biases if has_bias else []))
    return outs[0] if single else list(outs)
