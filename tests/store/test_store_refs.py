"""Ref resolution: every form, plus the errors a user sees for bad or ambiguous refs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from store_helpers import ckpt

from ckptdiff.errors import CkptError
from ckptdiff.store import Store, refs, store as store_mod
from ckptdiff.store.refs import RefRow, resolve

ROWS = [
    RefRow("aaaa1111bbbb2222", "base", 0),
    RefRow("aaaa1111cccc3333", None, 10),
    RefRow("bbbb0000dddd4444", "best", 20),
    RefRow("cccc9999eeee5555", "best", 20),
]


@pytest.mark.parametrize("ref,index", [
    ("latest", 3), ("first", 0), ("latest~0", 3), ("latest~1", 2), ("latest~3", 0),
    ("step:10", 1), ("step:20", 3), ("base", 0), ("best", 3),
    ("aaaa1111bbbb2222", 0), ("aaaa1111c", 1), ("bbbb", 2), ("CCCC9", 3),
])
def test_forms(ref, index):
    assert resolve(ref, ROWS) == index


def test_ambiguous_prefix_names_candidates():
    with pytest.raises(CkptError) as e:
        resolve("aaaa1111", ROWS, "st@aaaa1111")
    msg = str(e.value)
    assert "ambiguous" in msg and "aaaa1111bbbb2222" in msg and "aaaa1111cccc3333" in msg
    assert msg.startswith("st@aaaa1111: ")


@pytest.mark.parametrize("ref,match", [
    ("latest~4", "only 4 snapshots"),
    ("step:5", r"no snapshot at step 5 \(steps in the store: 0, 10, 20\)"),
    ("nope", "unknown snapshot ref 'nope'.*latest is cccc9999eeee5555.*tags: base, best"),
    ("aaa", "unknown snapshot ref"),  # too short to be a prefix
    ("ffff", "unknown snapshot ref"),
])
def test_errors(ref, match):
    with pytest.raises(CkptError, match=match):
        resolve(ref, ROWS)


def test_empty_store():
    with pytest.raises(CkptError, match="no snapshots yet"):
        resolve("latest", [])


def test_store_resolves_and_reports_ambiguity(raw_store, monkeypatch):
    ids = iter(["abcd00000000000a", "abcd00000000000b", "ef01000000000000"])
    monkeypatch.setattr(store_mod, "new_id", lambda: next(ids))
    for step in (1, 2, 3):
        raw_store.snapshot(ckpt({"w": np.full(2, step, np.int8)}), step=step, tag="t" if step == 2 else None)
    assert raw_store.resolve("abcd00000000000b").step == 2
    assert raw_store.resolve("ef01").step == 3
    assert raw_store.resolve("t").step == 2
    assert raw_store.resolve("latest~2").step == 1
    with pytest.raises(CkptError, match="ambiguous.*abcd00000000000a, abcd00000000000b"):
        raw_store.resolve("abcd")
    with pytest.raises(CkptError, match="ambiguous"):
        raw_store.entries("abcd0")


def test_min_prefix_is_documented():
    assert refs.MIN_PREFIX == 4 and "latest~K" in refs.FORMS


def test_the_store_package_answers_is_store_without_importing_the_store(tmp_path):
    """``is_store`` costs a stat: importing the package loads neither sqlite3 nor the store's
    modules until one of its other names is used, and then every exported name resolves."""
    Store.open(tmp_path / "st", create=True).close()
    probe = (
        "import sys, ckptdiff.store as s\n"
        "assert s.is_store(sys.argv[1]) and not s.is_store(sys.argv[2])\n"
        "assert 'sqlite3' not in sys.modules and 'ckptdiff.store.store' not in sys.modules\n"
        "ns = {}\n"
        "exec('from ckptdiff.store import *', ns)\n"
        "assert set(s.__all__) <= set(ns) and set(s.__all__) <= set(dir(s))\n"
        "assert ns['Store'] is s.store.Store and 'sqlite3' in sys.modules\n"
        "try:\n"
        "    s.NoSuchName\n"
        "except AttributeError as e:\n"
        "    print('AttributeError', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "st"), str(tmp_path)], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == "AttributeError module 'ckptdiff.store' has no attribute 'NoSuchName'"
