"""Events of the DeepEP-compatible API: ``EventHandle`` (one recorded CUDA event) and
``EventOverlap`` (DeepEP's wrapper with ``current_stream_wait()`` and ``with`` support).

Also importable as ``deep_ep.utils`` once :func:`moecomm.deep_ep.install` has run (Megatron-LM
imports ``EventHandle`` and ``EventOverlap`` from there). Nothing here imports torch until an
event is recorded or waited on, so the module loads on machines without torch.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from .. import _C


def _torch():
    import torch

    return torch


class EventHandle:
    """A CUDA event recorded on a stream. ``EventHandle()`` records on the current torch stream
    (DeepEP's ``EventHandle()``); the Buffer makes the others itself."""

    __slots__ = ("_ev", "device")

    def __init__(self) -> None:
        torch = _torch()
        self.device = torch.cuda.current_device()
        self._ev = _C.CudaEvent(self.device)
        self._ev.record(torch.cuda.current_stream(self.device).cuda_stream)

    @classmethod
    def _wrap(cls, ev: "_C.CudaEvent", device: int) -> "EventHandle":
        h = cls.__new__(cls)
        h._ev = ev
        h.device = device
        return h

    def current_stream_wait(self) -> None:
        """The current torch stream waits for the event (no host synchronisation)."""
        torch = _torch()
        self._ev.stream_wait(torch.cuda.current_stream(self.device).cuda_stream)

    def stream_wait(self, stream: Any) -> None:
        """``stream`` (a torch stream or a ``cudaStream_t`` int) waits for the event."""
        self._ev.stream_wait(stream if isinstance(stream, int) else stream.cuda_stream)

    def synchronize(self) -> None:
        """Blocks the host until the event has completed."""
        self._ev.synchronize()

    def query(self) -> bool:
        return self._ev.query()


class EventOverlap:
    """DeepEP's event wrapper: ``event`` (an :class:`EventHandle`, or None when the call was not
    asynchronous) and ``extra_tensors``, tensors kept alive until the event was waited on (the
    stream-recording DeepEP does this way so that it works under CUDA graphs).

    ``with event_overlap: ...`` runs the block, then makes the current stream wait for the event
    (nothing to wait for when ``event`` is None)."""

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """The current torch stream waits for the event. Raises for an event-less overlap (the
        call was synchronous: pass ``async_finish=True`` to get an event)."""
        if self.event is None:
            raise _C.InvalidArgument(
                "EventOverlap.current_stream_wait: this overlap holds no event (the call ran "
                "with async_finish=False, so the current stream already waits for it)")
        self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
            self.extra_tensors = None

    def __repr__(self) -> str:
        return f"EventOverlap(event={'None' if self.event is None else 'EventHandle'})"


__all__ = ["EventHandle", "EventOverlap"]
