"""``ckptdiff diff`` on edge cases: selections that match nothing, empty, disjoint and identical
inputs, symlinks, and store references that name no snapshot."""

from __future__ import annotations

import json
from cli_helpers import cli, one_error


def test_include_that_matches_nothing_is_an_error(files, capsys):
    rc, out, err = cli(capsys, "diff", files["x"], files["x"], "--include", "enc*")
    assert rc == 2 and out == ""
    assert "--include 'enc*' selected none of the tensors (1 in OLD, 1 in NEW)" in one_error(err)
    # two empty checkpoints are not a selection mistake: a normal, honest pass
    rc, out, err = cli(capsys, "diff", files["empty"], files["empty_npz"], "--include", "enc*")
    assert rc == 0 and out.splitlines()[-1] == "PASS: no tensors to compare"


def test_empty_disjoint_self_and_symlink(files, tmp_path, capsys):
    rc, out, _ = cli(capsys, "diff", files["empty"], files["empty_npz"])
    assert rc == 0 and out.splitlines()[-2:] == [
        "0 tensors: none compared; no manifest (roles unknown, drift not checked)", "PASS: no tensors to compare"]
    rc, out, _ = cli(capsys, "diff", files["x"], files["empty"], "-f", "json")
    rep = json.loads(out)
    assert rc == 1 and [(t["name"], t["status"]) for t in rep["tensors"]] == [("x", "removed")]
    rc, out, _ = cli(capsys, "diff", files["x"], files["empty"])
    assert out.splitlines()[-1] == "FAIL: 1 tensor differs (--fail-on change)"
    rc, out, _ = cli(capsys, "diff", files["x"], files["y"], "-f", "json")
    assert rc == 1 and {t["name"]: t["status"] for t in json.loads(out)["tensors"]} == {"x": "removed", "y": "added"}
    link = tmp_path / "link.safetensors"
    link.symlink_to(files["x"])
    rc, out, _ = cli(capsys, "diff", files["x"], link, "-f", "json", "--all")
    rep = json.loads(out)
    assert rc == 0 and rep["summary"]["identical"] == 1 and rep["tensors"][0]["hash_old"] == rep["tensors"][0]["hash_new"]


def test_store_ref_to_a_non_store_or_empty_ref(files, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    rc, _, err = cli(capsys, "diff", f"{plain}@latest", files["x"])
    assert rc == 2 and f"{plain}: is not a ckptdiff store, so '{plain}@latest' names no snapshot" in one_error(err)
    rc, _, err = cli(capsys, "diff", f"{files['x']}@latest", files["x"])
    assert rc == 2 and "is not a ckptdiff store" in one_error(err)
    st = tmp_path / "st"
    assert cli(capsys, "snapshot", files["x"], "--store", st)[0] == 0
    for cmd in (["diff", f"{st}@", files["x"]], ["show", f"{st}@"], ["export", f"{st}@", tmp_path / "o.safetensors"],
                ["rm", f"{st}@"]):
        rc, _, err = cli(capsys, *cmd)
        assert rc == 2 and "nothing after '@'" in one_error(err), cmd
    for cmd in ("log", "verify", "gc"):
        rc, _, err = cli(capsys, cmd, f"{st}@latest")
        assert rc == 2 and "takes a store directory, not DIR@REF" in one_error(err)
