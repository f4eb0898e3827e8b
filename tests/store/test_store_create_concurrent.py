"""Many processes creating the same new store at once: all succeed, one store, no snapshot lost.

Each trial starts 8 forked processes that wait on a barrier and then run
``ckptdiff snapshot CKPT --store NEW`` (through ``cli.main``, as the command
would) into the same directory that does not exist yet. Before stores were
published atomically, all but one failed ("directory is not empty"), and now
and then two succeeded while the second's database replaced the first's,
silently losing a snapshot.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os

import numpy as np
import pytest

from ckptdiff.cli import main
from ckptdiff.errors import CkptError
from ckptdiff.store import Store

WRITERS = 8
TRIALS = 4


def _snapshot_worker(barrier, ckpt: str, store: str, step: int, out) -> None:
    barrier.wait(timeout=60)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(["snapshot", ckpt, "--store", store, "--step", str(step)])
    out.put((step, rc, buf.getvalue().strip(), err.getvalue().strip()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("empty_dir_exists", [False, True], ids=["missing", "empty-dir"])
def test_concurrent_snapshots_into_a_new_store_all_land(tmp_path, empty_dir_exists):
    from safetensors.numpy import save_file

    ckpt = str(tmp_path / "w.safetensors")
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, ckpt)
    ctx = mp.get_context("fork")
    for trial in range(TRIALS):
        store = str(tmp_path / f"store{trial}")
        if empty_dir_exists:
            os.mkdir(store)
        barrier, out = ctx.Barrier(WRITERS), ctx.Queue()
        procs = [ctx.Process(target=_snapshot_worker, args=(barrier, ckpt, store, step, out))
                 for step in range(WRITERS)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        failures = [(step, rc, err) for step, rc, _sid, err in results if rc != 0]
        assert not failures, failures
        ids = {sid for _step, _rc, sid, _err in results}
        assert len(ids) == WRITERS
        with Store.open(store) as s:
            listed = {info.id for info in s.list()}
            assert listed == ids  # every snapshot that was reported is in the history
            assert s.verify().ok
        assert main(["verify", store]) == 0


def test_init_refuses_a_store_that_exists_and_create_opens_it(tmp_path):
    root = tmp_path / "store"
    Store.init(root).close()
    with pytest.raises(CkptError, match="already a ckptdiff store"):
        Store.init(root)
    with Store.open(root, create=True) as s:
        assert s.list() == []


def test_a_directory_with_other_files_is_still_refused(tmp_path):
    root = tmp_path / "store"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "notes.txt").write_text("mine")
    with pytest.raises(CkptError, match="not empty and is not a ckptdiff store"):
        Store.open(root, create=True)
    assert (root / "tmp" / "notes.txt").read_text() == "mine"
