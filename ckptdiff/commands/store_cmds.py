"""Store subcommands: init, snapshot, log, show, export, verify, rm, gc.

Thin wrappers: parse arguments, call :class:`ckptdiff.store.Store`, print.
Tables are plain aligned text on stdout (easy to grep and paste); ``--format
json`` gives a stable schema instead. Progress bars go to stderr and only on
a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import CkptError
from ..progress import byte_bar
from ..resolve import store_ref
from ..textsafe import printable

_REF_HELP = ("REF is an id or a unique id prefix (4+ hex digits), a tag, step:N (the newest\n"
             "snapshot at step N), latest, latest~K (K snapshots before the newest) or first.")

_EXIT = "exit codes:\n  0  done\n  2  trouble: a missing or damaged store, an unknown ref, bad flags (one line on stderr)"


def _fmt(help_text: str, exit_codes: str = _EXIT) -> dict[str, Any]:
    return {"formatter_class": argparse.RawDescriptionHelpFormatter, "description": help_text,
            "epilog": exit_codes}


def _step(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2^63-1, got {text}")
    return v


def _keep(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="create an empty snapshot store", **_fmt(
        "Create a snapshot store: a directory where each distinct tensor is stored once,\n"
        "addressed by its BLAKE3 hash, with the history in SQLite (ckptdiff.db).\n\n"
        "examples:\n  ckptdiff init runs/store            # raw blobs, fastest\n"
        "  ckptdiff init runs/store --compress  # lossless zstd over float byte planes"))
    p.add_argument("dir", metavar="DIR", help="a new or empty directory (created if missing)")
    p.add_argument("--compress", action="store_true",
                   help="compress blobs losslessly (zstd over byte planes; measured ~16%% smaller for fp32 "
                        "and ~32%% for bf16 weights, at ~200 MiB/s)")
    p.set_defaults(func=run_init)

    p = sub.add_parser("snapshot", help="record a checkpoint in a store; prints the snapshot id", **_fmt(
        "Record CHECKPOINT (any format ckptdiff reads, or another DIR@REF) as a new snapshot.\n"
        "Tensors already in the store (same bytes, any name) are not written again, so a\n"
        "fine-tune's snapshots cost one model plus the bytes that changed. The store is\n"
        "created if DIR does not exist. Prints the new snapshot id on stdout.\n\n"
        "examples:\n  ckptdiff snapshot base.safetensors --store runs/store --tag base --manifest trainable.json\n"
        "  ckptdiff snapshot ckpt-500.pt --store runs/store --step 500 --metric loss=1.83 --metric acc=0.91\n"
        "  ckptdiff snapshot other/store@best --store runs/store     # copy a snapshot between stores"))
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="any checkpoint file, sharded directory or DIR@REF")
    p.add_argument("--store", required=True, metavar="DIR", help="the store (created if missing)")
    p.add_argument("--step", type=_step, metavar="N",
                   help="training step, a whole number >= 0 (default: the checkpoint's own 'step', if any)")
    p.add_argument("--tag", help="a name for this snapshot, usable as a REF (the newest with a tag wins); "
                                 "not latest, first, latest~K or step:N, and no '@'")
    p.add_argument("--message", help="a free-text note")
    # -m is --manifest, as in 'ckptdiff diff': the same letter must not mean two things
    p.add_argument("--manifest", "-m", metavar="FILE",
                   help="trainable/frozen manifest JSON (default: one embedded in the checkpoint; "
                        "otherwise the nearest earlier snapshot's)")
    p.add_argument("--metric", action="append", default=[], metavar="K=V",
                   help="a metric to record, e.g. loss=1.83 (repeatable; numbers stay numbers)")
    p.add_argument("--compress", action="store_true", help="when the store is created here, compress it")
    p.set_defaults(func=run_snapshot)

    p = sub.add_parser("log", help="list a store's snapshots with changes and drift", **_fmt(
        "One row per snapshot, oldest first: id, time, step, tag, tensors changed vs its\n"
        "parent, drift (frozen tensors, per the manifest, whose bytes, dtype or shape differ\n"
        "from the first snapshot's; '-' when no manifest is known) and metrics. Per-tensor\n"
        "metrics (drift_max_abs/<tensor>) are shown as their maximum; 'ckptdiff show'\n"
        "lists them. On a terminal each row is cut to its width. Reads no tensor data,\n"
        "unless --causes asks why each drifted tensor moved (weight decay, optimizer step,\n"
        "running statistics, ...; see docs/causes.md): then the drifted tensors, and only\n"
        "those, are diffed against the first snapshot.\n\n"
        "examples:\n  ckptdiff log runs/store\n  ckptdiff log runs/store --causes\n"
        "  ckptdiff log runs/store --format json | jq '.snapshots[-1]'"))
    p.add_argument("dir", metavar="DIR", help="the store directory")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (schema ckptdiff.log/1)")
    p.add_argument("--causes", action="store_true",
                   help="say why each drifted tensor moved (reads the drifted tensors)")
    p.set_defaults(func=run_log)

    p = sub.add_parser("show", help="list one snapshot's tensors and metadata", **_fmt(
        "Show a snapshot's metadata and its tensors (name, dtype, shape, hash, role).\n"
        + _REF_HELP + "\n\nexamples:\n  ckptdiff show runs/store@latest\n"
        "  ckptdiff show runs/store@step:500 --format json"))
    p.add_argument("ref", metavar="DIR@REF", help="the snapshot (a bare DIR means DIR@latest)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json (schema ckptdiff.snapshot/1, full hashes)")
    p.set_defaults(func=run_show)

    p = sub.add_parser("export", help="write a snapshot back out as .safetensors or .pt", **_fmt(
        "Write a snapshot as a plain checkpoint file, bit-identical to what was recorded\n"
        "(every tensor is re-hashed on the way out; a damaged blob fails the export and\n"
        "leaves no file). " + _REF_HELP + "\n\n"
        "examples:\n  ckptdiff export runs/store@best best.safetensors\n"
        "  ckptdiff export runs/store@latest~1 prev.pt\n"
        "  ckptdiff export runs/store@step:500 model.bin --format safetensors --force"))
    p.add_argument("ref", metavar="DIR@REF", help="the snapshot (a bare DIR means DIR@latest)")
    p.add_argument("out", metavar="OUT", help="the file to write (refused if it exists, unless --force)")
    p.add_argument("--format", choices=("safetensors", "pt"),
                   help="output format (default: pt for .pt/.pth/.bin names, else safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run_export)

    p = sub.add_parser("verify", help="re-hash every blob; exit 1 naming damaged snapshots", **_fmt(
        "Re-hash every blob the history references and check every entry. Exit 0 when\n"
        "everything is intact, 1 when a blob is missing or corrupt (each affected snapshot\n"
        "and tensor is named), 2 when the store cannot be read.\n\n"
        "example:\n  ckptdiff verify runs/store", exit_codes=(
            "exit codes:\n  0  every blob is intact\n  1  damage found (each affected snapshot and tensor is named)\n"
            "  2  trouble: no such store, unreadable database, bad flags")))
    p.add_argument("dir", metavar="DIR", help="the store directory")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json")
    p.set_defaults(func=run_verify)

    p = sub.add_parser("rm", help="remove a snapshot from history (then gc frees its bytes)", **_fmt(
        "Remove one snapshot from the history. Its children are re-parented and keep\n"
        "their manifest; blobs stay on disk until 'ckptdiff gc'. " + _REF_HELP + "\n\n"
        "example:\n  ckptdiff rm runs/store@step:100 && ckptdiff gc runs/store"))
    p.add_argument("ref", metavar="DIR@REF", help="the snapshot to remove (the @REF is required)")
    p.set_defaults(func=run_rm)

    p = sub.add_parser("gc", help="delete blobs no snapshot references", **_fmt(
        "Delete blobs that no snapshot references (left by rm, or by a writer killed\n"
        "mid-snapshot) and temp files over an hour old. Referenced blobs are never\n"
        "removed, and gc waits for snapshots in progress. With --keep-last N, first\n"
        "remove every snapshot except the newest N and the tagged ones.\n\n"
        "examples:\n  ckptdiff gc runs/store\n  ckptdiff gc runs/store --keep-last 10"))
    p.add_argument("dir", metavar="DIR", help="the store directory")
    p.add_argument("--keep-last", type=_keep, metavar="N",
                   help="first remove all but the newest N snapshots, keeping every tagged one "
                        "(0: keep only the tagged ones)")
    p.set_defaults(func=run_gc)


# -- helpers ------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _metric_str(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        parts.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _log_metrics(metrics: dict[str, Any]) -> str:
    """A history row's metrics: the run's own, and per-tensor ones folded into one summary each."""
    from ..store.model import PER_TENSOR_METRIC_PREFIXES, is_per_tensor_metric

    text = _metric_str({k: v for k, v in metrics.items() if not is_per_tensor_metric(k)})
    for prefix in PER_TENSOR_METRIC_PREFIXES:
        values = [v for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, (int, float))]
        if values:
            n = len(values)
            summary = f"{prefix[:-1]}={max(values):.6g} (max of {n} tensor{'s' if n != 1 else ''})"
            text = f"{text} {summary}" if text else summary
    return text


def _terminal_width() -> int | None:
    """The terminal's width when stdout is one; None when output goes to a pipe or a file."""
    import shutil

    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _fit(text: str, width: int | None) -> str:
    """Cut each line to ``width`` terminal cells with an ellipsis: one screen line per row."""
    if width is None:
        return text
    from rich.cells import cell_len, set_cell_size

    return "\n".join(line if cell_len(line) <= width else set_cell_size(line, width - 1) + "…"
                     for line in text.split("\n"))


_MAX_CELL = 64


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    # Names, tags and metrics come from untrusted files: one visible line per row.
    rows = [[printable(c) for c in r] for r in rows]
    from rich.cells import cell_len  # terminal cells: CJK and emoji are two wide

    widths = [cell_len(h) for h in header]
    for r in rows:
        # One 300-character name should not push every other row's columns off screen:
        # columns fit cells up to _MAX_CELL wide, and a longer cell just runs over.
        widths = [max(w, min(cell_len(c), _MAX_CELL)) for w, c in zip(widths, r)]
    lines = []
    for r in [list(header), *rows]:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths)):
            pad = " " * max(0, w - cell_len(c))
            cells.append(pad + c if i in right else c + pad)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _store_dir(path: str) -> str:
    """The DIR argument of log/verify/gc: a store, not a snapshot of one."""
    from ..store import is_store

    if "@" in path and not is_store(path):
        base = path.rpartition("@")[0]
        if base and is_store(base):
            raise CkptError("takes a store directory, not DIR@REF (to see one snapshot: ckptdiff show "
                            f"{path})", path)
    return path


def _parse_metrics(texts: Sequence[str]) -> dict[str, float | int | str]:
    out: dict[str, float | int | str] = {}
    for text in texts:
        key, val = _parse_metric(text)
        if key in out:
            raise CkptError(f"--metric {key} is given twice ({out[key]!r} and {val!r}); give each metric once")
        out[key] = val
    return out


def _parse_metric(text: str) -> tuple[str, float | int | str]:
    key, sep, val = text.partition("=")
    if not sep or not key.strip():
        raise CkptError(f"--metric expects KEY=VALUE, e.g. --metric loss=1.83; got {text!r}")
    if not val.strip():
        raise CkptError(f"--metric {key.strip()} has no value; expected KEY=VALUE, e.g. --metric loss=1.83")
    for conv in (int, float):
        try:
            return key.strip(), conv(val)
        except ValueError:
            continue
    return key.strip(), val


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


# -- commands -----------------------------------------------------------------------------

def run_init(args: argparse.Namespace) -> int:
    from ..store import Store

    with Store.init(args.dir, compress=args.compress) as s:
        kind = "zstd over byte planes" if s.compressed else "none"
        print(f"initialized an empty ckptdiff store in {args.dir} (compression: {kind})")
    return 0


def run_snapshot(args: argparse.Namespace) -> int:
    from ..localpath import refuse_url
    from ..manifest import Manifest
    from ..resolve import open_checkpoint
    from ..store import Store
    from ..store.refs import check_tag
    from ..store.store import check_names

    refuse_url(args.store, "store")  # before the checkpoint is read
    metrics = _parse_metrics(args.metric)
    if args.tag is not None:
        check_tag(args.tag)  # before any tensor is read or written
    manifest = Manifest.load(args.manifest) if args.manifest else None
    with open_checkpoint(args.checkpoint) as ckpt:
        if manifest is None:
            manifest = ckpt.manifest
        step = args.step
        if step is None:
            meta_step = ckpt.metadata.get("step")
            if isinstance(meta_step, int) and not isinstance(meta_step, bool):
                step = meta_step
        check_names(ckpt)  # before a new store directory is made for a checkpoint it cannot hold
        store = Store.open(args.store, create=True, compress=args.compress)
        if args.compress and not store.compressed:
            # Compression is chosen once per store; say so rather than silently ignore the flag.
            print(f"ckptdiff: note: --compress ignored: {printable(args.store)} already exists as an "
                  "uncompressed store (compression is chosen by 'ckptdiff init --compress')", file=sys.stderr)
        with store:
            src = ckpt.path if ckpt.format == "store" else os.path.abspath(args.checkpoint)
            with byte_bar("snapshot") as progress:
                sid = store.snapshot(ckpt, step=step, tag=args.tag, message=args.message, metrics=metrics,
                                     manifest=manifest, source=src, progress=progress)
    print(sid)
    return 0


def run_log(args: argparse.Namespace) -> int:
    from ..store import Store

    with Store.open(_store_dir(args.dir)) as s:
        rows = s.log()
        usage = s.disk_usage()
    causes: dict[str, dict[str, Any]] = {}
    if args.causes:
        from ..timeline import drift_causes

        causes = drift_causes(_store_dir(args.dir), {r.info.id: r.drift_names for r in rows})
    if args.format == "json":
        snaps = [r.to_dict() for r in rows]
        if args.causes:
            for d, r in zip(snaps, rows):
                d["drift_causes"] = {n: {"cause": c, "cause_detail": det}
                                     for n, (c, det) in causes.get(r.info.id, {}).items()}
        _dump({"schema": "ckptdiff.log/1", "store": args.dir, "disk_usage": usage, "snapshots": snaps})
        return 0
    if not rows:
        print(f"{args.dir}: no snapshots yet (add one with 'ckptdiff snapshot CHECKPOINT --store {args.dir}')")
        return 0
    table = []
    for r in rows:
        i = r.info
        table.append([
            i.id[:12], _when(i.created_at), "" if i.step is None else str(i.step), i.tag or "",
            "root" if r.changed is None else str(r.changed), "-" if r.drift is None else str(r.drift),
            _log_metrics(i.metrics),
        ])
    print(_fit(_table(["ID", "CREATED", "STEP", "TAG", "CHANGED", "DRIFT", "METRICS"], table, right=(2, 4, 5)),
               _terminal_width()))
    if args.causes:
        _print_causes(rows, causes)
    logical = sum(r.info.total_bytes for r in rows)
    print(f"\n{len(rows)} snapshot{'s' if len(rows) != 1 else ''}, {human_bytes(logical)} of tensors, "
          f"{human_bytes(usage)} on disk.")
    print("CHANGED: tensors that differ from the parent. DRIFT: frozen tensors (per the manifest) that differ "
          "from the first snapshot; '-' without a manifest.")
    return 0


def _print_causes(rows: Sequence[Any], causes: dict[str, dict[str, Any]]) -> None:
    """Why each drift happened, said once per tensor and cause: a tensor that decays at every
    snapshot is one line (from the first snapshot where it drifted so), not fifty."""
    from ..cause import explain

    seen: dict[str, str] = {}
    lines = []
    for r in rows:
        for name, (cause, detail) in causes.get(r.info.id, {}).items():
            if cause is None or seen.get(name) == cause:
                continue
            seen[name] = cause
            lines.append(f"  {r.info.id[:12]}  {printable(name)}: {explain(cause, detail)}")
    if lines:
        print("\nWhy frozen tensors drifted (from the first snapshot where each cause appears):")
        print("\n".join(lines))


def run_show(args: argparse.Namespace) -> int:
    from ..store import Store
    from ..store.history import effective_manifest, roles_manifest

    root, ref = store_ref(args.ref)
    with Store.open(root) as s:
        info = s.resolve(ref)
        entries = s.entries(info.id)
        by_id = {i.id: i for i in s.list()}
    manifest = effective_manifest(info.id, by_id)
    roles_man = roles_manifest(info.id, by_id)  # training state as buffers, as a diff treats it
    roles = {n: (roles_man.role(n) if roles_man is not None else "unknown") for n in entries}
    if args.format == "json":
        d = info.to_dict()
        d["effective_manifest"] = None if manifest is None else manifest.to_dict()
        d["tensors"] = [dict(e.to_dict(), role=roles[n]) for n, e in entries.items()]
        _dump({"schema": "ckptdiff.snapshot/1", "store": root, **d})
        return 0
    if info.manifest is not None:
        man = "own"
    elif manifest is not None:
        man = "inherited from an earlier snapshot"
    else:
        man = "none (roles unknown)"
    meta = [("snapshot", info.id), ("parent", info.parent or "(root)"), ("created", _when(info.created_at)),
            ("step", "" if info.step is None else str(info.step)), ("tag", info.tag or ""),
            ("message", info.message or ""), ("metrics", _metric_str(info.metrics)), ("source", info.source or ""),
            ("manifest", man), ("tensors", f"{info.n_tensors} ({human_bytes(info.total_bytes)})"),
            ("training", ", ".join(info.auxiliary) + " (state beside the model: buffers, never drift)"
             if info.auxiliary else "")]
    for k, v in meta:
        if v:
            print(f"{k:<9} {printable(v)}")
    print()
    rows = [[n, e.dtype, "x".join(str(d) for d in e.shape) if e.shape else "()", e.hash[:16], roles[n]]
            for n, e in entries.items()]
    print(_table(["NAME", "DTYPE", "SHAPE", "HASH", "ROLE"], rows) if rows else "(no tensors)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..store import Store

    root, ref = store_ref(args.ref)
    fmt = args.format or _export_format(args.out)
    with Store.open(root) as s:
        with byte_bar("export") as progress:
            info = s.export(ref, args.out, fmt, overwrite=args.force, progress=progress)
    print(f"exported snapshot {info.id} ({info.n_tensors} tensors, {human_bytes(info.total_bytes)}) "
          f"to {args.out} as {fmt}", file=sys.stderr)
    return 0


_OTHER_SUFFIXES = (".npz", ".npy", ".h5", ".hdf5", ".json", ".txt")


def _export_format(out: str) -> str:
    """The format an OUT name asks for; a name that promises another format is refused."""
    low = out.lower()
    if low.endswith((".pt", ".pth", ".bin")):
        return "pt"
    if low.endswith(_OTHER_SUFFIXES):
        suffix = os.path.splitext(low)[1]
        raise CkptError(f"export writes .safetensors or .pt files, not {suffix}; pick another name, or pass "
                        "--format safetensors (or pt) to write one under this name anyway", out)
    return "safetensors"


def run_verify(args: argparse.Namespace) -> int:
    from ..store import Store

    with Store.open(_store_dir(args.dir)) as s:
        with byte_bar("verify") as progress:
            res = s.verify(progress=progress)
    if args.format == "json":
        _dump(res.to_dict())
        return 0 if res.ok else 1
    for err in res.errors:
        print(f"ERROR {err}")
    for b in res.bad:
        print(f"BAD blob {b.hash[:16]}…: {b.problem}")
        for sid, name in b.affected:
            print(f"    snapshot {sid}  tensor {name}")
    status = "ok" if res.ok else "FAILED"
    line = (f"{status}: re-hashed {res.blobs_checked} blobs ({human_bytes(res.bytes_checked)}) referenced by "
            f"{res.snapshots} snapshots; {len(res.bad)} damaged")
    if res.errors:
        line += f", {len(res.errors)} other problem{'s' if len(res.errors) != 1 else ''} (ERROR lines above)"
    if res.unreferenced:
        line += f", {res.unreferenced} unreferenced (run 'ckptdiff gc' to free those)"
    print(line)
    return 0 if res.ok else 1


def run_rm(args: argparse.Namespace) -> int:
    from ..store import Store

    root, ref = store_ref(args.ref, bare_means_latest=False)
    with Store.open(root) as s:
        info = s.remove(ref)
        free = s.reclaimable_bytes()
    what = ", ".join(x for x in (f"step {info.step}" if info.step is not None else "",
                                 f"tag {info.tag}" if info.tag else "") if x)
    print(f"removed snapshot {info.id}{f' ({what})' if what else ''}; "
          f"'ckptdiff gc {root}' would free {human_bytes(free)}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    from ..store import Store

    with Store.open(_store_dir(args.dir)) as s:
        res = s.gc(keep_last=args.keep_last)
        usage = s.disk_usage()
    if res.snapshots_removed:
        print(f"removed {len(res.snapshots_removed)} snapshots: {', '.join(i[:12] for i in res.snapshots_removed)}")
    extra = f", {res.temp_files_removed} stale temp files" if res.temp_files_removed else ""
    print(f"freed {human_bytes(res.bytes_freed)} ({res.blobs_removed} blobs{extra}); "
          f"kept {res.blobs_kept} referenced blobs, {human_bytes(usage)} on disk")
    return 0
