"""Reports of many tensors: JSON streamed in batches and the plain-string table keep their output.

The JSON rows are written in batches (a 200,000-tensor report is never one
string); the table lays out its rows itself instead of through rich's Table.
These check the seams: batch boundaries, the CLI's file output, column
alignment, folding of long names, and identical tensors kept to one line.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.cells import cell_len

from ckptdiff import Checkpoint, diff
from ckptdiff import render as render_mod
from ckptdiff.cli import main
from ckptdiff.render import render_json, render_table


@pytest.mark.parametrize("batch", [1, 7, 299, 300, 4096])
def test_json_batches_join_into_exactly_the_report_to_json(many_small, monkeypatch, batch):
    a, b = many_small(300, 3)
    rep = diff(Checkpoint.from_arrays(a), Checkpoint.from_arrays(b))
    monkeypatch.setattr(render_mod, "_JSON_BATCH", batch)
    assert render_json(rep) == rep.to_json() + "\n"


def test_json_of_an_empty_report_matches_json_dumps():
    rep = diff(Checkpoint.from_arrays({}), Checkpoint.from_arrays({}))
    assert render_json(rep) == rep.to_json() + "\n"


def test_cli_json_file_is_the_report_of_a_many_tensor_pair(tmp_path, capsys):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    a = {f"experts.{i}.w": rng.standard_normal(8).astype(np.float32) for i in range(5000)}
    b = {k: (v + np.float32(1) if i % 9 == 0 else v) for i, (k, v) in enumerate(a.items())}
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    out = tmp_path / "r.json"
    assert main(["diff", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-f", "json",
                 "--all", "-o", str(out), "--no-progress"]) == 1
    with Checkpoint.from_arrays(a) as ca, Checkpoint.from_arrays(b) as cb:
        want = json.loads(diff(ca, cb).to_json())
    got = json.loads(out.read_text())
    assert got["summary"] == want["summary"] and got["summary"]["changed"] == 556
    # Paths and formats differ (files vs memory), and the file lists tensors in its own order.
    for rep in (got, want):
        del rep["old"], rep["new"]
        rep["tensors"].sort(key=lambda t: t["name"])
        rep["verdict"]["reasons"].sort()
    assert got == want


def test_table_rows_align_and_long_names_fold_inside_their_column():
    long = "encoder.layers.0.attention.self.query_key_value.weight_" + "x" * 80
    old = {f"layer.{i}.w": np.zeros(4, np.float32) for i in range(30)} | {long: np.zeros(3, np.float32)}
    new = {k: v + 1 for k, v in old.items()}
    buf = io.StringIO()
    render_table(diff(Checkpoint.from_arrays(old), Checkpoint.from_arrays(new)), buf, width=100)
    lines = buf.getvalue().splitlines()
    assert all(cell_len(line) <= 100 for line in lines)
    header = lines[1]
    rows = [line for line in lines[2:] if line.startswith("  ") and "changed  unknown" in line]
    assert len(rows) == 31
    for col, cell in (("status", "changed"), ("role", "unknown")):
        assert {line.index(cell) for line in rows} == {header.index(col)}
    # The long name is whole once its pieces are joined, and every piece sits in the name column.
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("encoder."))
    pieces = [lines[first].split()[0]]
    for line in lines[first + 1:]:
        if not line.startswith("  ") or line[header.index("status"):].strip():
            break  # a row of its own, or the lines after the table
        pieces.append(line.strip())
    assert "".join(pieces) == long and len(pieces) > 1


def test_table_keeps_identical_tensors_to_one_line_unless_asked():
    old = {f"t{i}": np.zeros(2, np.float32) for i in range(1000)}
    new = dict(old, t7=np.ones(2, np.float32))
    rep = diff(Checkpoint.from_arrays(old), Checkpoint.from_arrays(new))
    buf = io.StringIO()
    render_table(rep, buf)
    text = buf.getvalue()
    assert "(999 identical tensors hidden; --all shows them)" in text and len(text.splitlines()) < 10
    every = io.StringIO()
    render_table(rep, every, show_all=True)
    assert sum(line.split()[0].startswith("t") for line in every.getvalue().splitlines()[2:-2]) == 1000


def test_plain_table_is_the_coloured_table_without_its_escape_codes():
    """The plain table pads whole columns; the coloured one styles cell by cell: same layout, wide names too."""
    import re

    old = {"a.w": np.zeros(4, np.float32), "层.权重": np.zeros(3, np.float32), "gone": np.zeros(2, np.float32),
           "e\u0301.bias": np.zeros(5, np.float32), "grows": np.zeros(2, np.float32)}
    new = {"a.w": np.ones(4, np.float32), "层.权重": np.zeros(3, np.float32) + 2, "e\u0301.bias": np.zeros(5, np.float32),
           "grows": np.zeros(3, np.float32), "new": np.zeros(1, np.float64)}
    rep = diff(Checkpoint.from_arrays(old), Checkpoint.from_arrays(new))
    plain, coloured = io.StringIO(), io.StringIO()
    render_table(rep, plain, color=False, show_all=True, width=120)
    render_table(rep, coloured, color=True, show_all=True, width=120)
    assert "\x1b[" in coloured.getvalue() and "\x1b[" not in plain.getvalue()
    unstyled = re.sub(r"\x1b\[[0-9;]*m", "", coloured.getvalue())
    # (a styled last cell keeps its padding inside the escape codes; the plain line is right-stripped)
    assert [line.rstrip() for line in unstyled.splitlines()] == plain.getvalue().splitlines()
    assert "层.权重" in plain.getvalue() and "shape changed" in plain.getvalue()


@pytest.mark.parametrize("width", [None, 100, 60])
@pytest.mark.parametrize("show_all", [False, True])
def test_table_off_a_terminal_is_what_rich_prints_without_rich(monkeypatch, tmp_path, width, show_all):
    """Off a terminal the table is written without rich: the same text its console prints there."""
    from ckptdiff.manifest import Manifest

    long = "encoder.layers.0.attention.self.query_key_value.weight_" + "x" * 90
    old = {"backbone.w": np.zeros((4, 4), np.float32), "backbone.b": np.zeros(4, np.float32),
           "head.w": np.zeros(3, np.float32), "head.stuck": np.ones(2, np.float32), long: np.zeros(2, np.float32),
           "层.权重": np.zeros(3, np.float32), "[red]x:thumbs_up:": np.zeros(1, np.float32)}
    new = dict(old, **{"backbone.w": np.full((4, 4), 0.5, np.float32), "head.w": np.ones(3, np.float32),
                       long: np.ones(2, np.float32), "层.权重": np.ones(3, np.float32)})
    man = Manifest(trainable=["head.*"], frozen=["*"])
    rep = diff(Checkpoint.from_arrays(old), Checkpoint.from_arrays(new), manifest=man)
    rep.old.path = str(tmp_path / "[bold]old:smile:.safetensors")
    assert rep.drifted and rep.stale and any(t.cause for t in rep.drifted)

    def table(through_rich: bool) -> str:
        monkeypatch.setattr(render_mod, "_may_be_terminal", lambda file: through_rich)
        buf = io.StringIO()
        render_table(rep, buf, show_all=show_all, width=width)
        return buf.getvalue()

    plain = table(False)
    assert plain == table(True)
    assert "[bold]old:smile:" in plain and ("[red]x:thumbs_up:" in plain) is show_all
    assert ("(2 identical tensors hidden; --all shows them)" in plain) is not show_all
    assert ("terminal too narrow" in plain) is (width is not None)
