"""Copying live tensors to host memory so a snapshot can be written while training goes on.

The training thread only *starts* copies; hashing and writing happen on the
writer thread. Host memory is bounded: one set of staging buffers, reused
from snapshot to snapshot (the writer keeps at most one snapshot in flight,
so a buffer is never overwritten while it is being read), sized by the
tensors of one snapshot (trainable + changed), never the whole history.

On CUDA, parameters are copied into pinned buffers with ``non_blocking=True``
on a side stream that first waits for the training stream, so the copy
overlaps the next forward/backward; the tracker makes the training stream
wait for the copy's event only right before the next ``optimizer.step()``
writes the parameters again. Buffers (running stats) are written by the
forward pass itself, so they are copied on the training stream, ordered
before it. On CPU the same code path copies synchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import dtypes
from ..checkpoint import TensorRef
from .model import Slot


@dataclass(eq=False)
class Capture:
    """Host copies of some slots, ready once :meth:`wait` returns."""

    refs: dict[str, TensorRef]
    stamps: dict[int, tuple[int, int]]  # slot index -> (version, data_ptr) at capture time
    nbytes: int
    #: CUDA events the writer waits on before reading the host bytes.
    events: list[Any] = field(default_factory=list)
    #: (device, event) pairs the training stream must wait on before writing parameters again.
    param_events: list[tuple[Any, Any]] = field(default_factory=list)

    def wait(self) -> None:
        for e in self.events:
            e.synchronize()


def _view_of(host: Any) -> Callable[[], memoryview]:
    def view() -> memoryview:
        return memoryview(host.numpy())
    return view


class HostStaging:
    """Reusable host buffers (pinned for CUDA sources), keyed by slot index."""

    def __init__(self) -> None:
        self._bufs: dict[int, Any] = {}
        self._streams: dict[Any, Any] = {}
        #: The most host memory ever staged at once (what ``stats["staging_bytes"]`` reports).
        self.peak_bytes = 0

    @property
    def held_bytes(self) -> int:
        return sum(b.numel() for b in self._bufs.values())

    def release(self) -> None:
        """Free the buffers (at close: a tracker kept around for its drift_events must not pin host memory)."""
        self._bufs.clear()
        self._streams.clear()

    def _buffer(self, key: int, nbytes: int, pinned: bool) -> Any:
        import torch

        buf = self._bufs.get(key)
        if buf is None or buf.numel() != nbytes or buf.is_pinned() != pinned:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            self._bufs[key] = buf
        return buf

    def _side_stream(self, device: Any) -> Any:
        import torch

        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    def capture(self, slots: Sequence[tuple[int, Slot]], whole: Callable[[Slot], Any] | None = None) -> Capture:
        """Start copying ``slots`` (index, slot) to host; returns at once on CUDA, after the copy on CPU.

        ``whole(slot)`` gives a sharded slot's full tensor (a collective:
        called for each sharded slot in index order). Each is copied as soon
        as it is gathered, on the training stream (so its memory is reused
        only after the copy), and dropped: the gathered tensors are never all
        alive at once.
        """
        import torch

        used = {i for i, _ in slots}
        for key in [k for k in self._bufs if k not in used]:
            del self._bufs[key]  # bounded: only the current snapshot's tensors stay staged
        refs: dict[str, TensorRef] = {}
        stamps: dict[int, tuple[int, int]] = {}
        total = 0
        side: dict[Any, list[tuple[Any, Any]]] = {}
        current: dict[Any, list[tuple[Any, Any]]] = {}
        for i, slot in slots:
            stamps[i] = slot.stamp()
            gathered = slot.sharded and whole is not None
            t = whole(slot) if gathered else slot.tensor.detach()
            nbytes = t.numel() * t.element_size()
            on_cuda = t.device.type == "cuda"
            host = self._buffer(i, nbytes, pinned=on_cuda)
            dst = host.view(t.dtype).view(t.shape)
            if not on_cuda:
                dst.copy_(t)
            elif gathered:  # copied now, on the training stream, so the gathered tensor can go at once
                dst.copy_(t, non_blocking=True)
                current.setdefault(t.device, [])  # the event recorded below covers this copy
            else:
                (side if slot.kind == "param" else current).setdefault(t.device, []).append((dst, t))
            total += nbytes
            ref_view = _view_of(host)
            dt = dtypes.from_torch(t.dtype).name  # not slot.dtype: model.half() after attach changes it
            for name in slot.names:
                refs[name] = TensorRef(name, dt, tuple(t.shape), view=ref_view, source="hook")
        cap = Capture(refs, stamps, total)
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        for device, pairs in current.items():
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            cap.events.append(ev)
        for device, pairs in side.items():
            stream = self._side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            cap.events.append(ev)
            cap.param_events.append((device, ev))
        return cap


def stream_refs(slots: Sequence[Slot], chunk_bytes: int = 16 << 20,
                gathered: Mapping[int, Any] | None = None) -> dict[str, TensorRef]:
    """Lazy refs that read live tensors when the store asks (for the baseline, written while attach waits).

    CPU tensors are exposed zero-copy; CUDA tensors are copied to host one
    chunk at a time, so the baseline of any model size needs only
    ``chunk_bytes`` of host memory. ``gathered`` holds the full host copy of
    each sharded slot, by slot index.
    """
    refs: dict[str, TensorRef] = {}
    for k, slot in enumerate(slots):
        t = gathered[k] if gathered and k in gathered else slot.tensor
        if t.device.type == "cpu":
            maker: dict[str, Any] = {"view": _live_cpu_view(t)}
        else:
            maker = {"pieces": _live_device_pieces(t, chunk_bytes)}
        for name in slot.names:
            refs[name] = TensorRef(name, slot.dtype, tuple(t.shape), source="hook", **maker)
    return refs


def _live_cpu_view(t: Any) -> Callable[[], memoryview]:
    import torch

    def view() -> memoryview:
        x = t.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        return memoryview(x.reshape(-1).view(torch.uint8).numpy()) if x.numel() else memoryview(b"")
    return view


def _live_device_pieces(t: Any, chunk_bytes: int) -> Callable[[], Any]:
    import torch

    def pieces() -> Any:
        x = t.detach()
        if not x.is_contiguous():
            x = x.contiguous()
        flat = x.reshape(-1).view(torch.uint8) if x.numel() else x.reshape(-1)
        for start in range(0, flat.numel(), chunk_bytes):
            yield memoryview(flat[start:start + chunk_bytes].cpu().numpy())
    return pieces


__all__ = ["Capture", "HostStaging", "stream_refs"]
