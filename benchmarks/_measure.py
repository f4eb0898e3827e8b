"""Time one child process and read its own peak RSS.

Why ``os.wait4`` and not ``getrusage(RUSAGE_CHILDREN)``: the latter is the
maximum over *every* child so far, so after the hand-written script (GBs)
every later number would read the same. ``wait4`` returns the rusage of
exactly the child it reaped.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Run:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    #: Killed at the time limit: wall_s is then a lower bound.
    timed_out: bool = False
    #: CPU seconds (user + system) of the child, all its threads.
    cpu_s: float = 0.0


@dataclass
class Timing:
    """Best-of-N wall time of one command, with the peak RSS of that best run."""

    label: str
    tool: str
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    #: Whether the output was right (ckptdiff only): the benchmark checks, not just times.
    check: str | None = None

    @property
    def best(self) -> Run | None:
        return min(self.runs, key=lambda r: r.wall_s) if self.runs else None

    @property
    def wall_s(self) -> float | None:
        b = self.best
        return b.wall_s if b else None

    @property
    def timed_out(self) -> bool:
        return bool(self.runs) and all(r.timed_out for r in self.runs)

    @property
    def cpu_s(self) -> float | None:
        """The least CPU time of any run (CPU time is noisy too, but only upwards)."""
        return min(r.cpu_s for r in self.runs) if self.runs else None

    @property
    def peak_rss_mb(self) -> float | None:
        return max(r.peak_rss_mb for r in self.runs) if self.runs else None


def run_once(cmd: list[str], stdout_path: str | None = None, ok_codes: tuple[int, ...] = (0,),
             timeout_s: float | None = None) -> Run:
    """Run ``cmd`` once; stdout to ``stdout_path`` (or /dev/null), stderr kept for the error message.

    A child still running after ``timeout_s`` is killed and reported as
    timed out (its wall time is then a lower bound).
    """
    with tempfile.TemporaryFile() as err:
        out = open(stdout_path, "wb") if stdout_path else open(os.devnull, "wb")  # noqa: SIM115
        timer = None
        try:
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
            if timeout_s:
                timer = threading.Timer(timeout_s, p.kill)
                timer.start()
            _pid, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
        finally:
            if timer is not None:
                timer.cancel()
            out.close()
        p.returncode = code = os.waitstatus_to_exitcode(status)
        if timeout_s and code == -signal.SIGKILL and wall >= timeout_s:
            kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
            return Run(wall, kib / 1024, code, timed_out=True, cpu_s=usage.ru_utime + usage.ru_stime)
        if code not in ok_codes:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(cmd[:3])}... exited {code}: {' | '.join(tail)}")
    # ru_maxrss is KiB on Linux, bytes on macOS.
    kib = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss
    return Run(wall, kib / 1024, code, cpu_s=usage.ru_utime + usage.ru_stime)


def time_command(
    label: str,
    tool: str,
    cmd: list[str],
    repeat: int,
    *,
    ok_codes: tuple[int, ...] = (0,),
    slow_after_s: float = 5.0,
    timeout_s: float | None = None,
) -> Timing:
    """Best of ``repeat`` runs; a command slower than ``slow_after_s`` runs once (it is not the close call)."""
    t = Timing(label, tool)
    try:
        for i in range(repeat):
            r = run_once(cmd, ok_codes=ok_codes, timeout_s=timeout_s)
            t.runs.append(r)
            if r.timed_out or (i == 0 and r.wall_s > slow_after_s):
                break
    except RuntimeError as e:
        t.error = str(e)
    return t


def time_interleaved(label: str, cmds: dict[str, tuple[list[str], tuple[int, ...]]], rounds: int) -> dict[str, Timing]:
    """Run each command once per round, alternating, and keep the best of each.

    Memory bandwidth on a shared machine drifts by 2x within seconds; taking
    the floor and the tool under test side by side, round by round, keeps
    their ratio honest where back-to-back blocks of runs would not.
    """
    out = {tool: Timing(label, tool) for tool in cmds}
    for _ in range(rounds):
        for tool, (cmd, ok_codes) in cmds.items():
            t = out[tool]
            if t.error:
                continue
            try:
                t.runs.append(run_once(cmd, ok_codes=ok_codes))
            except RuntimeError as e:
                t.error = str(e)
    return out


def warm(paths: list[str]) -> None:
    """Put every file in the page cache as a first read from disk leaves it, so all tools, and
    every format of one pair, see the same warm cache.

    Each file is flushed and dropped from the cache (``fsync`` + ``POSIX_FADV_DONTNEED``), then
    read once. Without the drop, a file still cached from when it was written keeps the pages
    its writer left: the shards the safetensors library writes were ~15% slower to read, even
    for ``cat``, than the same bytes read back from disk, which measured the writer, not the
    reader. Where the drop is not available the files are only read.
    """
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)
    buf = bytearray(1 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cpu_model() -> str:
    """The CPU's model name, printed with every result: timings depend on it, and
    ``platform.processor()`` is empty on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
