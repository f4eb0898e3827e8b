"""numpy, ml_dtypes and torch load only when they are needed.

A diff of identical safetensors files runs without numpy; changed tensors
are measured by the C statistics module, still without numpy, and give the
numbers the numpy fallback gives; a zip .pt pair is read without torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import blake3
import ml_dtypes
import numpy as np
import pytest

from ckptdiff import compare, stats
from engine_helpers import write_pair


_PROBE = """
import sys
from ckptdiff.cli import main
code = main(["diff", sys.argv[1], sys.argv[2], "--format", "json", "--all", "-o", sys.argv[3]])
print(code, "numpy" in sys.modules, "ml_dtypes" in sys.modules)
"""


def _probe(pa: str, pb: str, out: str, **env: str) -> tuple[str, str, str]:
    r = subprocess.run([sys.executable, "-c", _PROBE, pa, pb, out], capture_output=True, text=True, check=True,
                       env={**os.environ, **env})
    return tuple(r.stdout.split())  # type: ignore[return-value]


def test_safetensors_diff_never_imports_numpy(tmp_path):
    rng = np.random.default_rng(7)
    a = {"w": rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16),
         "b": rng.standard_normal(64).astype(np.float32)}
    pa, pb = write_pair(tmp_path, a, {k: v.copy() for k, v in a.items()})
    code, has_np, has_ml = _probe(pa, pb, str(tmp_path / "same.json"))
    assert (code, has_np, has_ml) == ("0", "False", "False")
    rep = json.loads((tmp_path / "same.json").read_text())
    w = {t["name"]: t for t in rep["tensors"]}["w"]
    assert w["status"] == "identical" and w["hash_old"] == blake3.blake3(a["w"].tobytes()).hexdigest()
    # differing tensors (bf16 too): the C module measures them, still no numpy;
    # with the numpy fallback forced, numpy loads, and the numbers are the same
    b = {k: v.copy() for k, v in a.items()}
    b["b"][0] += 1
    b["w"][3, 5] = 2.5
    pa, pb = write_pair(tmp_path, a, b, name="moved")
    reports = {}
    for backend, loads in (("auto", "False"), ("numpy", "True")):
        if backend == "auto" and stats.backend() != "c":
            continue  # no C module in this install: the numpy run below still checks the numbers
        out = tmp_path / f"moved-{backend}.json"
        code, has_np, has_ml = _probe(pa, pb, str(out), CKPTDIFF_STATS=backend)
        assert (code, has_np, has_ml) == ("1", loads, loads)
        reports[backend] = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
    for rep in reports.values():
        assert rep["b"]["changed_elements"] == 1
        assert rep["b"]["max_abs_delta"] == pytest.approx(1.0, rel=1e-6)
        assert rep["w"]["changed_elements"] == 1
        assert rep["w"]["max_abs_delta"] == pytest.approx(abs(2.5 - float(a["w"][3, 5])), rel=1e-12)
    if len(reports) == 2:
        assert reports["auto"]["w"]["rel_l2"] == pytest.approx(reports["numpy"]["w"]["rel_l2"], rel=1e-12)


def test_pt_diff_imports_neither_numpy_nor_torch(tmp_path):
    """A zip .pt pair with changed fp32 and bf16 tensors: ckptdiff's own zip reader
    and the C statistics module, so neither numpy nor torch loads."""
    if stats.backend() != "c":
        pytest.skip("the C statistics module is not in use (not built, or CKPTDIFF_STATS=numpy) (numpy measures instead)")
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(64, 64, generator=g), "h": torch.randn(32, generator=g).to(torch.bfloat16)}
    b = {"w": a["w"].clone(), "h": a["h"].clone()}
    b["w"][1, 2] += 0.5
    b["h"][4] = 7.0
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    probe = ("import sys\nfrom ckptdiff.cli import main\n"
             "code = main(['diff', sys.argv[1], sys.argv[2], '--format', 'json', '-o', sys.argv[3]])\n"
             "print(code, 'numpy' in sys.modules, 'torch' in sys.modules)")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), str(out)],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["1", "False", "False"]
    rep = {t["name"]: t for t in json.loads(out.read_text())["tensors"]}
    assert rep["w"]["changed_elements"] == 1
    assert rep["w"]["max_abs_delta"] == pytest.approx(0.5, rel=1e-6)
    assert rep["h"]["changed_elements"] == 1
    assert rep["h"]["max_abs_delta"] == pytest.approx(abs(7.0 - float(a["h"][4])), rel=1e-12)


def _write_sharded(directory, arrays):  # noqa: ANN001, ANN202
    """A two-shard Hugging Face directory: two safetensors files and their index."""
    from safetensors.numpy import save_file

    directory.mkdir()
    weight_map = {}
    for k, names in enumerate((["b"], ["w"])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: arrays[n] for n in names}, str(directory / shard))
        weight_map.update({n: shard for n in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(directory)


@pytest.mark.parametrize("fmt,layout", [("json", "file"), ("table", "file"), ("json", "sharded")])
def test_a_safetensors_diff_loads_only_the_code_it_runs(tmp_path, fmt, layout):
    """Start-up is most of a small diff's time: a JSON diff of two safetensors files or sharded
    directories, or its table off a terminal, written with -o, loads no other command's code, no
    store (sqlite3; a directory is only checked for a store's database), no zip reader, no rich,
    no shutil, no dataclasses (it imports inspect), no typing, no ctypes."""
    a = {"w": np.arange(16, dtype=np.float32), "b": np.ones(4, dtype=np.float32)}
    b = {"w": a["w"] + 1, "b": a["b"]}
    if layout == "file":
        pa, pb = write_pair(tmp_path, a, b)
    else:
        pa, pb = _write_sharded(tmp_path / "a", a), _write_sharded(tmp_path / "b", b)
    unwanted = ["ckptdiff.commands.store_cmds", "ckptdiff.commands.tui_cmd", "ckptdiff.commands.report_cmd",
                "ckptdiff.store.store", "ckptdiff.store.db", "sqlite3", "zipfile", "rich", "shutil", "numpy",
                "dataclasses", "inspect", "typing"] + (["ctypes"] if compare._ckernel is not None else [])
    probe = ("import sys\nfrom ckptdiff.cli import main\n"
             f"code = main(['diff', sys.argv[1], sys.argv[2], '--format', '{fmt}', '-o', sys.argv[3]])\n"
             "print(code, *[m for m in sys.argv[4].split(',') if m in sys.modules])")
    out = tmp_path / f"r.{fmt}"
    r = subprocess.run([sys.executable, "-c", probe, pa, pb, str(out), ",".join(unwanted)],
                       capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["1"], r.stdout
    if fmt == "json":
        assert json.loads(out.read_text())["summary"]["changed"] == 1
    else:
        assert out.read_text().splitlines()[-1] == "FAIL: 1 tensor differs (--fail-on change)"
