"""Side-by-side benchmark of ``ckptdiff diff``.

One command generates deterministic checkpoint pairs under
``benchmarks/data/`` (reused when present), warms the page cache, and times,
each as its own process so start-up and peak RSS count for everyone:

* ``cat A B > /dev/null``: the floor (reading the bytes, nothing else);
* ``ckptdiff diff A B --format json``;
* the hand-written script (torch/safetensors load, ``(a-b).abs().max()``,
  ``hashlib.sha256`` per tensor): ``benchmarks/_baseline_script.py``;
* diffai's ``diff_paths``: ``benchmarks/_baseline_diffai.py``.

The pairs (``_data.py``): a 1 GB fp32 LM as one safetensors file, a
``.pt`` and a 4-shard Hugging Face directory; bf16; 2,000 small tensors;
50,000 tensors (512 MiB a side), whose table output is also timed against
its JSON output; 200,000 tiny tensors; 2,000 tensors of 51 KiB; a 768 MiB
HDF5 pair; and a two-tensor pair for start-up.

It prints the CPU model, best-of-N wall and CPU times, peak RSS, and every
ratio against its target (``TARGETS``), and exits 1 when one is missed.
Ratios measured side by side carry over to other machines; seconds do not.
Timings are never asserted in the test suite; this is where they live.

usage::

    .venv/bin/python benchmarks/bench_diff.py            # full run (~1 GB pairs)
    .venv/bin/python benchmarks/bench_diff.py --quick    # smoke run: 1/16 the bytes, 1/10 the tensors
    .venv/bin/python benchmarks/bench_diff.py --big      # + 2 GB-a-side memory check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _measure import Timing, cpu_model, run_once, time_command, time_interleaved, warm  # noqa: E402

#: The project's targets (on a 2-core machine), each a ratio measured side by
#: side in one run, except the few stated in seconds or MB. Keyed by the
#: pair they are stated for; --quick pairs (smaller, so start-up weighs
#: more) print the same ratios as information only.
#:   floor: ckptdiff / cat;  script, diffai: that baseline / ckptdiff;
#:   twin: ckptdiff on this format / on the same pair as one safetensors file;
#:   table: table output / JSON output;  wall_s, rss_mb: absolute.
TARGETS: dict[str, dict[str, float]] = {
    "tiny": {"wall_s": 0.060},
    "fp32_1g": {"floor": 1.5, "script": 10.0, "diffai": 10.0},
    "fp32_1g/pt": {"twin": 1.2},
    "fp32_1g/shards4": {"twin": 1.2},
    "small2000": {"floor": 3.0},
    "small51k": {"floor": 3.0, "script": 10.0},
    "many50k": {"floor": 3.0, "table": 1.1},
    "tiny200k": {"wall_s": 1.0, "rss_mb": 100.0},
    "lm_h5/h5": {"floor": 2.5, "rss_mb": 50.0},
}
#: Peak RSS everywhere (the --big pair is 2 GB a side).
TARGET_RSS_MB = 400.0
#: Pairs the slow baselines (script, diffai) run on; elsewhere they would only burn minutes.
BASELINE_PAIRS = {"fp32_1g", "bf16", "small2000", "small2000_lite", "small51k",
                  "fp32_quick", "bf16_quick", "small_quick", "small51k_quick"}
#: Pairs whose table output is timed beside their JSON output.
TABLE_PAIRS = {"many50k", "many5k_quick"}
#: A pair of at most this many bytes a side runs in a few tenths of a second or less, where one slow
#: moment of a shared host can spoil a best-of-5 of either tool: cat and ckptdiff get SHORT_ROUNDS
#: times the rounds there (seconds in all).
SHORT_PAIR_BYTES = 512 << 20
SHORT_ROUNDS = 3
#: Formats compared with the same pair as one safetensors file, in the same rounds.
TWIN_FORMATS = ("pt", "shards4", "h5")


def byte_compile_ckptdiff() -> None:
    """Write ckptdiff's .pyc files, as installing a wheel does.

    An editable install (the README's set-up) compiles modules on first
    import, unless PYTHONDONTWRITEBYTECODE is set, as it is in some shells
    and containers: then every run re-compiles the changed modules from
    source (~20 ms). The baselines' packages were byte-compiled by pip.
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("ckptdiff")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return
    for where in spec.submodule_search_locations:
        compileall.compile_dir(where, quiet=1)


#: The ckptdiff command the benchmark times (see install_wheel); the environment's own until then.
_CKPTDIFF: list[str] = []


def ckptdiff_cmd() -> list[str]:
    if _CKPTDIFF:
        return list(_CKPTDIFF)
    exe = os.path.join(os.path.dirname(sys.executable), "ckptdiff")
    if os.path.exists(exe):
        return [exe]
    return [sys.executable, "-m", "ckptdiff.cli"]


def install_wheel(where: str, log) -> list[str] | None:  # noqa: ANN001
    """This checkout installed as ``pip install .`` installs it, into a scratch environment; its command.

    The README's set-up is an editable install, whose import hook in
    ``site`` (setuptools' finder: it imports ``pathlib``, ``urllib.parse``
    and more) costs every ckptdiff process ~5 ms that no installed copy
    pays. So the benchmark times a regular install of the same code: a
    fresh venv at ``where`` that takes its dependencies (numpy, safetensors,
    blake3, ...) from this environment through a ``.pth`` file, with
    ckptdiff built and installed into it by this environment's pip. None
    (and the environment's own ckptdiff is timed) when that fails.
    """
    root = os.path.dirname(HERE)
    shutil.rmtree(where, ignore_errors=True)
    py = os.path.join(where, "bin", "python")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", where], check=True, capture_output=True)
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                              capture_output=True, text=True).stdout.strip()
        deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        with open(os.path.join(site, "_benchmark_dependencies.pth"), "w") as f:
            f.write("\n".join(deps) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps",
                        "--no-build-isolation", root], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()[-1:] or [""]
        log(f"could not install ckptdiff as a wheel ({detail[0]}); timing this environment's ckptdiff instead")
        return None
    exe = os.path.join(where, "bin", "ckptdiff")
    return [exe] if os.path.exists(exe) else None


@dataclass
class PairInfo:
    """A generated pair as _data.py describes it (this process never imports numpy)."""

    name: str
    fmt: str
    a: str
    b: str
    bytes_per_side: int
    tensors: int
    changed: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.fmt})"


def generate(quick: bool, big: bool, data: str) -> list[PairInfo]:
    """Run the generator as a child process; see _data.main for why."""
    cmd = [sys.executable, os.path.join(HERE, "_data.py"), "--data", data]
    cmd += ["--quick"] * quick + ["--big"] * big
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [PairInfo(**json.loads(line)) for line in out.splitlines() if line.strip()]


@dataclass
class Case:
    pair: PairInfo
    timings: dict[str, Timing]

    def t(self, tool: str) -> float | None:
        tm = self.timings.get(tool)
        return tm.wall_s if tm else None


def check_output(pair: PairInfo, path: str) -> str:
    """The benchmark is only fair if ckptdiff found what the generator changed."""
    # Only the summary, which comes before the rows: loading a 200,000-row report here would
    # grow this process, and Linux charges its resident pages to every later child's peak RSS.
    with open(path) as f:
        head = f.read(1 << 16)
    start = head.find('"summary": {')
    if start < 0:
        return "WRONG: no summary in the first 64 KiB of the report"
    summary = json.loads(head[start + len('"summary": '):head.index("}", start) + 1])
    want_changed = pair.changed
    got = summary.get("changed")
    if got != want_changed:
        return f"WRONG: ckptdiff reported {got} changed tensors, generator changed {want_changed}"
    return f"ok: {got} of {pair.tensors} tensors changed, as generated"


def files_of(path: str) -> list[str]:
    """A checkpoint's files: itself, or every file of a sharded directory."""
    if os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path))
    return [path]


def bench_pair(pair: PairInfo, tools: list[str], repeat: int, log, timeout_s: float | None = None) -> Case:  # noqa: ANN001
    warm(files_of(pair.a) + files_of(pair.b))
    py = sys.executable
    cmds = {
        "cat": ["cat", *files_of(pair.a), *files_of(pair.b)],
        "ckptdiff": ckptdiff_cmd() + ["diff", pair.a, pair.b, "--format", "json"],
        "script": [py, os.path.join(HERE, "_baseline_script.py"), pair.a, pair.b],
        "diffai": [py, os.path.join(HERE, "_baseline_diffai.py"), pair.a, pair.b],
    }
    rounds = max(repeat, 3) * (SHORT_ROUNDS if pair.bytes_per_side <= SHORT_PAIR_BYTES else 1)
    fast = {"cat": (cmds["cat"], (0,)), "ckptdiff": (cmds["ckptdiff"], (0, 1))}
    if pair.name in TABLE_PAIRS:
        fast[TABLE] = (ckptdiff_cmd() + ["diff", pair.a, pair.b], (0, 1))
    twin = _safetensors_twin(pair)
    if twin is not None:
        # A format against the same tensors in one safetensors file compares ckptdiff with itself:
        # run both in the same rounds.
        warm(list(twin))
        fast[ST_TWIN] = (ckptdiff_cmd() + ["diff", *twin, "--format", "json"], (0, 1))
    log(f"  {pair.label:<24} {', '.join(fast)}  x{rounds}, interleaved ...")
    timings = time_interleaved(pair.label, fast, rounds)
    for tool in [t for t in tools if t not in ("cat", "ckptdiff")]:
        log(f"  {pair.label:<24} {tool:<9} x{repeat} (once if it takes over 5 s) ...")
        timings[tool] = time_command(pair.label, tool, cmds[tool], repeat, timeout_s=timeout_s)
    for tool, tm in timings.items():
        if tm.error:
            log(f"    {tool} failed: {tm.error}")
    case = Case(pair, timings)
    # One more ckptdiff run, output kept, to check it found the generated changes.
    out = os.path.join(pair_dir(pair), f".{pair.name}.{pair.fmt}.json")
    try:
        run_once(cmds["ckptdiff"], stdout_path=out, ok_codes=(0, 1))
        note = check_output(pair, out)
    except (RuntimeError, ValueError, OSError) as e:
        note = f"WRONG: {e}"
    finally:
        if os.path.exists(out):
            os.remove(out)
    log(f"    check: {note}")
    case.timings["ckptdiff"].check = note
    return case


#: Tool name of ckptdiff run on the .safetensors twin of a .pt, sharded or HDF5 pair.
ST_TWIN = "ckptdiff on the .safetensors twin"
#: Tool name of ckptdiff writing its default table (to /dev/null: plain text, 160 columns).
TABLE = "ckptdiff, table output"


def _safetensors_twin(pair: PairInfo) -> tuple[str, str] | None:
    if pair.fmt not in TWIN_FORMATS:
        return None
    a, b = (os.path.splitext(p)[0] + ".safetensors" for p in (pair.a, pair.b))
    return (a, b) if os.path.exists(a) and os.path.exists(b) else None


def pair_dir(pair: PairInfo) -> str:
    return os.path.dirname(pair.a)


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3f}" if x < 10 else f"{x:.1f}")


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2f}x" if x < 100 else f"{x:.0f}x")


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(c: Case, a: str, b: str) -> float | None:
    """ckptdiff against ckptdiff timed in the same rounds: the median of the rounds' ratios a / b.

    Each round runs both one after the other, so a round's ratio sees one
    state of the host; the median of those is steadier than the ratio of
    two bests, which one lucky run of either side decides.
    """
    ta, tb = c.timings.get(a), c.timings.get(b)
    if ta is None or tb is None or ta.error or tb.error or not ta.runs or len(ta.runs) != len(tb.runs):
        return None
    return statistics.median(x.wall_s / y.wall_s for x, y in zip(ta.runs, tb.runs))


def table(cases: list[Case]) -> list[str]:
    rows = ["| pair | size/side | tensors | tool | best wall s | CPU s | runs | peak RSS MB | × cat floor |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for c in cases:
        floor = c.t("cat")
        size = f"{c.pair.bytes_per_side / 2**20:.0f} MiB"
        for tool, tm in c.timings.items():
            if tm.error:
                rows.append(f"| {c.pair.label} | {size} | {c.pair.tensors:,} | {tool} | failed | | | | |")
                continue
            gt = "> " if tm.timed_out else ""
            rows.append(
                f"| {c.pair.label} | {size} | {c.pair.tensors:,} | {tool} | {gt}{_fmt_s(tm.wall_s)} | "
                f"{_fmt_s(tm.cpu_s)} | {len(tm.runs)} | "
                f"{tm.peak_rss_mb:.0f} | {gt}{_fmt_ratio(_div(tm.wall_s, floor))} |")
    return rows


def verdicts(cases: list[Case], big: Case | None, quick: bool) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, value, target, met) for every target the run measured; met is None for information."""
    out: list[tuple[str, float | None, str, bool | None]] = []
    startup = next((c for c in cases if c.pair.name == "tiny"), None)

    def add(what: str, value: float | None, op: str, target: float | None, *, lower_bound: bool = False) -> None:
        if target is None or quick:
            out.append((what, value, "(info)", None))
            return
        if value is None:
            out.append((what, value, f"{op} {target:g}", None))
            return
        ok = value <= target if op == "<=" else value >= target
        # A baseline killed at the time limit gives a lower bound: a pass if it already meets the target.
        out.append((what, value, f"{op} {target:g}", True if ok else (None if lower_bound else False)))

    for c in cases:
        lbl = c.pair.label
        want = TARGETS.get(c.pair.name if c.pair.fmt == "safetensors" else f"{c.pair.name}/{c.pair.fmt}", {})
        add(f"{lbl}: ckptdiff / cat floor", _div(c.t("ckptdiff"), c.t("cat")), "<=", want.get("floor"))
        for other in ("script", "diffai"):
            s = _div(c.t(other), c.t("ckptdiff"))
            if s is not None:
                killed = c.timings[other].timed_out
                note = " (baseline killed at the time limit: at least)" if killed else ""
                add(f"{lbl}: {other} / ckptdiff{note}", s, ">=", want.get(other), lower_bound=killed)
        if ST_TWIN in c.timings:
            add(f"{lbl}: ckptdiff {c.pair.fmt} / one safetensors file (median of the rounds' ratios)",
                _paired(c, "ckptdiff", ST_TWIN), "<=", want.get("twin"))
        if TABLE in c.timings:
            add(f"{lbl}: table output / JSON output (median of the rounds' ratios)", _paired(c, TABLE, "ckptdiff"),
                "<=", want.get("table"))
        if "wall_s" in want or quick and c.pair.name in ("tiny", "tiny20k_quick"):
            add(f"{lbl}: ckptdiff wall s", c.t("ckptdiff"), "<=", want.get("wall_s"))
        tm = c.timings.get("ckptdiff")
        if c.pair.tensors >= 10_000 and c.pair.fmt == "safetensors" and tm and tm.cpu_s is not None \
                and startup is not None and startup.timings["ckptdiff"].cpu_s is not None:
            # CPU of the whole process, less the tiny pair's (start-up), per tensor pair.
            per = (tm.cpu_s - startup.timings["ckptdiff"].cpu_s) / c.pair.tensors * 1e6
            add(f"{lbl}: ckptdiff CPU µs per tensor pair", per, "<=", 10.0 if c.pair.name == "tiny200k" else None)
        if tm and tm.peak_rss_mb is not None:
            limit = want.get("rss_mb", TARGET_RSS_MB)
            ok = tm.peak_rss_mb <= limit
            out.append((f"{lbl}: ckptdiff peak RSS MB", tm.peak_rss_mb,
                        "(info)" if quick and limit != TARGET_RSS_MB else f"<= {limit:.0f}",
                        None if quick and limit != TARGET_RSS_MB else ok))
    if big is not None:
        tm = big.timings["ckptdiff"]
        out.append((f"{big.pair.label}: ckptdiff peak RSS MB (2 GB a side)", tm.peak_rss_mb,
                    f"< {TARGET_RSS_MB:.0f}", None if tm.peak_rss_mb is None else tm.peak_rss_mb < TARGET_RSS_MB))
        out.append((f"{big.pair.label}: ckptdiff / cat floor", _div(big.t("ckptdiff"), big.t("cat")), "(info)", None))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Time ckptdiff diff against cat (the floor), a hand-written torch script and diffai.",
        epilog="Data is generated once under --data and reused; delete it to regenerate.")
    ap.add_argument("--quick", action="store_true", help="~1/16 sizes: a smoke run in seconds")
    ap.add_argument("--big", action="store_true",
                    help="also diff a 2 GB-a-side fp32 pair (memory check: peak RSS < 400 MB)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per fast command, best kept (default 5)")
    ap.add_argument("--baselines", default="script,diffai",
                    help="comma-separated baselines to run beside cat and ckptdiff (script, diffai; '' for none)")
    ap.add_argument("--only", default=None, help="comma-separated pair names to run (e.g. fp32_1g,small2000)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="kill a baseline (script, diffai) run after this many seconds (default 120)")
    ap.add_argument("--data", default=os.path.join(HERE, "data"), help="where generated pairs live")
    ap.add_argument("--out", default=None, help="also write results.json and results.md into this directory")
    ap.add_argument("--dev", action="store_true",
                    help="time this environment's ckptdiff (the editable install) instead of a regular install "
                         "of this checkout in a scratch venv under --data")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tools = [t.strip() for t in args.baselines.split(",") if t.strip()]
    unknown = set(tools) - {"script", "diffai"}
    if unknown:
        ap.error(f"unknown baseline(s): {', '.join(sorted(unknown))}")
    if "diffai" in tools:
        import importlib.util

        if importlib.util.find_spec("diffai") is None:
            log("diffai is not installed, so it is left out of this run "
                "(install it with: .venv/bin/pip install -e '.[bench]')")
            tools.remove("diffai")
    if shutil.which("cat") is None:
        log("cat not found: the floor cannot be measured")
        return 2
    t0 = time.perf_counter()
    installed = None if args.dev else install_wheel(os.path.join(args.data, ".wheel-env"), log)
    if installed:
        _CKPTDIFF[:] = installed
    else:
        byte_compile_ckptdiff()
    how = "a regular install of this checkout" if installed else "this environment's ckptdiff"
    log(f"timing {how}: {' '.join(ckptdiff_cmd())}")
    pairs = generate(args.quick, args.big, args.data)
    big_pair = pairs.pop() if args.big else None
    tiny = [p for p in pairs if p.name == "tiny"]
    pairs = [p for p in pairs if p.name != "tiny"]
    if args.only:
        keep = set(args.only.split(","))
        pairs = [p for p in pairs if p.name in keep]

    startup = bench_pair(tiny[0], [], max(args.repeat, 5), log) if tiny else None
    cases = [bench_pair(pair, tools if pair.name in BASELINE_PAIRS and pair.fmt in ("safetensors", "pt") else [],
                        args.repeat, log, args.timeout)
             for pair in pairs]
    big_case = bench_pair(big_pair, [], 3, log) if big_pair else None

    all_cases = ([startup] if startup else []) + cases + ([big_case] if big_case else [])
    lines = [f"ckptdiff diff benchmark - {cpu_model()} ({platform.machine()}), {os.cpu_count()} CPUs, "
             f"Python {platform.python_version()}, page cache warm, best of N wall time per process; "
             f"ckptdiff: {how}", ""]
    lines += table(all_cases)
    lines += ["", "| target | measured | wanted | met |", "|---|---:|---:|:---:|"]
    results = verdicts(([startup] if startup else []) + cases, big_case, args.quick)
    for what, value, target, ok in results:
        v = ("-" if value is None else f"{value:.0f}" if "RSS" in what else f"{value:.3f}" if what.endswith(" s")
             else f"{value:.1f}" if "µs" in what else _fmt_ratio(value))
        lines.append(f"| {what} | {v} | {target} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    lines.append("")
    if startup is not None and startup.t("ckptdiff") is not None:
        lines.append(f"ckptdiff fixed cost (interpreter start-up, imports, opening files; the 'tiny' pair): "
                     f"{startup.t('ckptdiff'):.3f} s")
    lines.append(f"(benchmark wall time {time.perf_counter() - t0:.0f} s)")
    print("\n".join(lines))

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({
                "cases": [{
                    "pair": c.pair.name, "format": c.pair.fmt, "bytes_per_side": c.pair.bytes_per_side,
                    "tensors": c.pair.tensors,
                    "tools": {k: {"best_s": v.wall_s, "runs": [r.wall_s for r in v.runs],
                                  "peak_rss_mb": v.peak_rss_mb, "error": v.error} for k, v in c.timings.items()},
                } for c in all_cases],
                "targets": [{"what": w, "value": v, "target": t, "met": ok} for w, v, t, ok in results],
            }, f, indent=2)
    failed = [r for r in results if r[3] is False]
    wrong = [c for c in all_cases if (c.timings["ckptdiff"].check or "").startswith("WRONG")]
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
