"""The snapshot chain: the baseline at attach, then snapshots that each inherit from the last one written.

Bytes are copied on the training thread to reused host buffers
(:mod:`.capture`), then hashed and written on the writer thread
(:mod:`.writer`), one snapshot in flight at most. Each snapshot names the
previous one it inherits unchanged tensors from; only a snapshot the store
accepted becomes that "previous one", so a failed write costs nothing but
its own step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .capture import Capture, HostStaging, stream_refs
from .failures import FailureLog
from .model import ModelTensors
from .schedule import SnapshotSchedule
from .writer import BackgroundWriter


class SnapshotChain:
    """Captures and writes the snapshots of one tracker; knows the baseline and the last snapshot written."""

    def __init__(self, tensors: ModelTensors, schedule: SnapshotSchedule, writer: BackgroundWriter,
                 failures: FailureLog, *, hooked_optimizer: bool) -> None:
        self.tensors = tensors
        self.schedule = schedule
        self.writer = writer
        self.failures = failures
        self.staging = HostStaging()
        self.hooked_optimizer = hooked_optimizer
        self.baseline_id: str | None = None
        self.baseline_hashes: dict[str, str] = {}
        self.last_id: str | None = None
        self.written_step: int | None = None  # step of the last snapshot the store accepted
        self.count = 0
        #: (device, event) pairs the next optimizer step waits on before overwriting parameters.
        self.param_wait: list[tuple[Any, Any]] = []

    def write_baseline(self, *, step: int, manifest: Any, resumed: bool, gathered: Mapping[int, Any]) -> None:
        """Write every tensor as it is now; raises what the store raised.

        Tensors are streamed from the live ones, except sharded ones, which
        come from ``gathered`` (their full host copies, by slot index).
        """
        refs = stream_refs(self.tensors.slots, gathered=gathered)
        message = "baseline at attach (resumed run)" if resumed else "baseline at attach"

        def job(store: Any) -> str:
            from ..progress import byte_bar

            with byte_bar("snapshot") as progress:  # a bar only on a terminal, for a large model
                sid = store.snapshot(refs, step=step, tag="baseline", message=message, manifest=manifest,
                                     source="hook", parent="latest", progress=progress)
            self.baseline_hashes = {n: e.hash for n, e in store.entries(sid).items()}
            return sid

        self.baseline_id = self.writer.call(job, "writing the baseline")
        self.written_step = step
        self.last_id = self.baseline_id
        self.count += 1

    def capture(self, chosen: Sequence[int], whole: Callable[[Any], Any] | None = None) -> Capture:
        """Start copying the slots ``chosen`` for the next snapshot (``whole`` gathers a sharded one)."""
        slots = self.tensors.slots
        cap = self.staging.capture([(i, slots[i]) for i in chosen], whole)
        if cap.param_events:
            if self.hooked_optimizer:
                self.param_wait = cap.param_events  # waited on in the next step's pre-hook
            else:
                import torch
                for device, event in cap.param_events:
                    torch.cuda.current_stream(device).wait_event(event)
        return cap

    def wait_for_copies(self) -> None:
        """Before an optimizer step: a snapshot's side-stream copy must finish before parameters change."""
        if self.param_wait:
            import torch
            for device, event in self.param_wait:
                torch.cuda.current_stream(device).wait_event(event)
            self.param_wait = []

    def write(self, store: Any, cap: Capture, *, step: int, tag: str | None, message: str | None,
              metrics: Mapping[str, Any]) -> str:
        """Writer thread: wait for the copies, write, and make this snapshot the one to inherit from."""
        cap.wait()
        sid = store.snapshot(cap.refs, step=step, tag=tag, message=message, metrics=metrics, source="hook",
                             parent="latest", inherit_from=self.last_id)
        self.failures.ok()
        self.written_step = step
        self.last_id = sid
        self.schedule.written(cap.stamps)
        self.count += 1
        return sid

    def close(self) -> None:
        """Free the host buffers (a tracker kept around for its drift_events must not pin host memory)."""
        self.staging.release()
        self.param_wait = []


__all__ = ["SnapshotChain"]
