"""Crash safety and concurrency, with real processes: kill -9 at random instants
and at each step of publishing a pack, two writers plus a garbage collector on
one store at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ckptdiff.checkpoint import Checkpoint
from ckptdiff.store import Store

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from ckptdiff.checkpoint import Checkpoint
    from ckptdiff.store import Store
    root, seed, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    go = sys.argv[4] if len(sys.argv) > 4 else None
    rng = np.random.default_rng(seed)
    frozen = {f"frozen.{i}": np.full(40_000, i, np.float32) for i in range(4)}
    frozen.update({f"frozen.small.{i}": np.full(9, i, np.float32) for i in range(100)})  # packed, shared
    s = Store.open(root)
    print("ready", flush=True)
    if go:
        import os, time
        while not os.path.exists(go):
            time.sleep(0.005)
    i = 0
    while count < 0 or i < count:
        arrays = dict(frozen)
        arrays["train.a"] = rng.standard_normal(150_000).astype(np.float32)
        arrays["train.b"] = rng.standard_normal(60_000).astype(np.float16)
        # small tensors, new in every snapshot: each writer fills a pack of its own
        arrays.update({f"expert.{j}": rng.standard_normal(16).astype(np.float32) for j in range(150)})
        print(s.snapshot(Checkpoint.from_arrays(arrays), step=i, metrics={"seed": seed}), flush=True)
        i += 1
""")

GC_LOOP = textwrap.dedent("""
    import os, sys, time
    from ckptdiff.store import Store
    root, stop = sys.argv[1], sys.argv[2]
    runs = 0
    with Store.open(root) as s:
        print("ready", flush=True)
        while not os.path.exists(stop):
            s.gc()
            runs += 1
            time.sleep(0.002)
    print(runs)
""")


#: Kills its own process (SIGKILL, as kill -9 does) at one step of publishing its pack.
CRASH_AT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from ckptdiff.checkpoint import Checkpoint
    from ckptdiff.store import Store, store as store_mod
    root, point = sys.argv[1], sys.argv[2]
    name, _, nth = point.partition(":")
    real = {"fsync": os.fsync, "replace": os.replace}
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def step(fn):
        def wrapped(*a):
            calls["n"] += 1
            if calls["n"] == int(nth):
                die()
            return real[fn](*a)
        return wrapped

    if name in real:
        setattr(os, name, step(name))
    elif name == "commit":
        store_mod.Store._commit = lambda *a, **k: die()
    s = Store.open(root)
    s.snapshot(Checkpoint.from_arrays({f"e.{j}": np.full(8, j + 100, np.float32) for j in range(50)}))
    print("not killed", flush=True)
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def _check_store(root: str, tmp_path) -> int:
    """verify passes and every listed snapshot exports completely and exactly."""
    with Store.open(root) as s:
        res = s.verify()
        assert res.ok, (res.bad, res.errors)
        infos = s.list()
        for info in infos:
            out = tmp_path / f"exp-{info.id}.safetensors"
            s.export(info.id, out)
            from ckptdiff.formats import open_checkpoint
            with open_checkpoint(os.fspath(out)) as c:
                assert len(c) == info.n_tensors and c.total_bytes == info.total_bytes
                from blake3 import blake3
                for name, e in s.entries(info.id).items():
                    assert blake3(c[name].read()).hexdigest() == e.hash
            out.unlink()
        return len(infos)


@pytest.mark.slow
def test_kill_9_at_random_instants_leaves_a_sound_store(tmp_path):
    root = os.fspath(tmp_path / "store")
    Store.init(root).close()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rnd = random.Random(1234)
    kills = 0
    listed = 0
    deadline = time.monotonic() + 25
    for n in range(30):
        if time.monotonic() > deadline and kills >= 20:
            break
        p = subprocess.Popen([sys.executable, str(script), root, str(n), "-1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=_env(), text=True)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        time.sleep(rnd.uniform(0.0, 0.15))  # a few snapshots: kills land anywhere in one
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        ids = [line.strip() for line in p.stdout.read().splitlines() if line.strip()]
        with Store.open(root) as s:
            assert s.verify().ok
            known = {i.id for i in s.list()}
            # every id the writer printed was committed and is listed
            assert set(ids) <= known
            listed = len(known)
    assert kills >= 20
    assert listed > 0
    assert _check_store(root, tmp_path) == listed
    with Store.open(root) as s:
        s.gc()
        assert s.verify().ok and s.verify().unreferenced == 0


# The pack is written and fsynced (fsync 1), its index written and fsynced
# (fsync 2), the pack renamed into packs/ (replace 1), then its index
# (replace 2), then the folder fsynced, then the database commit.
@pytest.mark.slow
@pytest.mark.parametrize("point,left_in_packs", [
    ("fsync:1", []), ("fsync:2", []), ("replace:1", []),
    ("replace:2", [".pack"]),  # a pack without its index: invisible to readers
    ("commit", [".idx", ".pack"]),  # a published pack no snapshot refers to
])
def test_kill_9_while_publishing_a_pack(tmp_path, point, left_in_packs):
    root = os.fspath(tmp_path / "store")
    packs = os.path.join(root, "packs")
    with Store.init(root) as s:
        base = s.snapshot(Checkpoint.from_arrays({f"e.{j}": np.full(8, j, np.float32) for j in range(50)}))
    base_files = sorted(os.listdir(packs))
    script = tmp_path / "crash.py"
    script.write_text(CRASH_AT)
    p = subprocess.run([sys.executable, str(script), root, point], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert p.returncode == -signal.SIGKILL and "not killed" not in p.stdout, (p.stdout, p.stderr)
    new = sorted(os.path.splitext(f)[1] for f in os.listdir(packs) if f not in base_files)
    assert new == left_in_packs
    assert all(f.endswith(".part") for f in os.listdir(os.path.join(root, "tmp")))
    with Store.open(root) as s:
        assert [i.id for i in s.list()] == [base]  # the commit never happened: history as it was
        res = s.verify()
        assert res.ok, (res.bad, res.errors)
        s.gc()
        assert sorted(os.listdir(packs)) == base_files and s.verify().unreferenced == 0
        s.snapshot(Checkpoint.from_arrays({"after": np.arange(5, dtype=np.int8)}))  # and the store works on
        assert s.verify().ok


@pytest.mark.slow
def test_two_writers_and_a_gc_at_once(tmp_path):
    root = os.fspath(tmp_path / "store")
    Store.init(root).close()
    writer = tmp_path / "writer.py"
    writer.write_text(WRITER)
    gcs = tmp_path / "gc.py"
    gcs.write_text(GC_LOOP)
    go, stop = tmp_path / "go", tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, str(writer), root, str(seed), "8", str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=_env(), text=True) for seed in (1, 2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    gc_proc = subprocess.Popen([sys.executable, str(gcs), root, str(stop)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=_env(), text=True)
    assert gc_proc.stdout is not None and gc_proc.stdout.readline().strip() == "ready"
    go.write_text("go")
    outs = [p.communicate(timeout=120) for p in procs]
    stop.write_text("stop")
    gc_out, gc_err = gc_proc.communicate(timeout=60)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert gc_proc.returncode == 0, gc_err
    assert int(gc_out) > 0
    ids = [line for out, _ in outs for line in out.split()[0:]]
    assert len(ids) == 16
    with Store.open(root) as s:
        infos = s.list()
        assert sorted(i.id for i in infos) == sorted(ids)
        # parents form one chain in commit order
        assert [i.parent for i in infos[1:]] == [i.id for i in infos[:-1]]
        assert {i.metrics["seed"] for i in infos} == {1, 2}
    assert _check_store(root, tmp_path) == 16
