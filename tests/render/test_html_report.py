"""``ckptdiff report``: one self-contained HTML page, parsed back (and, where chromium is, drawn)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from ckptdiff.cli import main
from ckptdiff.html_report import PALETTE, bucket, render_html
from ckptdiff.render import ordered
from ckptdiff.report import DiffReport, SideInfo, TensorDiff
from ckptdiff.timeline import Column, Timeline

SAMPLES = Path(__file__).resolve().parents[2] / "sample_ckpts"


class _Page(HTMLParser):
    """Tags, attributes and text of a page, and whatever would fetch something."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.fetches: list[str] = []
        self.text: list[str] = []
        self.rows = 0
        self.paths: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        self.tags.append(tag)
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.fetches.append(tag)
        for k in ("src", "href", "xlink:href"):
            if k in a:
                self.fetches.append(f"{tag} {k}={a[k]}")
        if tag == "tr":
            self.rows += 1
        if tag == "path":
            self.paths.append({k: v or "" for k, v in a.items()})

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        self.text.append(data)


def _parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    p.close()
    return p


def test_store_report_has_verdict_heatmap_metrics_and_table(tmp_path, capsys):
    out = tmp_path / "report.html"
    rc = main(["report", str(SAMPLES / "history"), "-o", str(out)])
    assert rc == 1  # the shipped history drifts
    text = out.read_text(encoding="utf-8")
    page = _parse(text)
    assert page.tags[0] == "html" and "svg" in page.tags and "table" in page.tags
    assert page.fetches == []
    low = text.lower()
    assert "http://" not in low and "https://" not in low and "url(" not in low and "@import" not in low
    words = " ".join(page.text)
    assert "FAIL: 2 frozen tensors drifted" in words
    assert "encoder.0.weight, encoder.0.bias drifted: weight decay, Δ = −0.0025·W" in words
    assert "Metrics" in words and "loss" in words
    # drifted cells are outlined: one red stroke path with a cell per drifted (tensor, snapshot)
    strokes = [p for p in page.paths if p.get("stroke") == "#d00"]
    assert len(strokes) == 1 and strokes[0]["d"].count("M") == 2 * 5  # two tensors, snapshots #5..#9
    assert len(text.encode()) < 64 * 1024


def test_pair_report_and_table_rows(tmp_path):
    out = tmp_path / "r.html"
    rc = main(["report", str(SAMPLES / "base.safetensors"), str(SAMPLES / "finetune_drifted.safetensors"),
               "-m", str(SAMPLES / "manifest.json"), "-o", str(out)])
    assert rc == 1
    page = _parse(out.read_text(encoding="utf-8"))
    assert page.rows == 1 + 11  # header + every changed tensor
    assert "weight decay, Δ = −0.0032·W" in " ".join(page.text)


def _timeline(layers: int, snaps: int, seed: int = 0) -> Timeline:
    rng = np.random.default_rng(seed)
    reports = []
    for j in range(snaps):
        tensors = []
        for i in range(layers):
            frozen = i % 3 == 0
            rel = float(10 ** rng.uniform(-7, 0.5))  # a colour change at (nearly) every cell: the worst case
            td = TensorDiff(name=f"model.layers.{i}.mlp.down_proj.weight", status="changed",
                            role="frozen" if frozen else "trainable", drift=frozen and j > snaps // 2,
                            dtype_old="float32", dtype_new="float32", shape_old=[64, 64], shape_new=[64, 64],
                            numel=4096, rel_l2=rel, max_abs_delta=rel, mean_abs_delta=rel,
                            changed_elements=4096, nan_new=0, inf_new=0, out_of_tolerance=4096,
                            cause="weight_decay" if frozen else "dense_update",
                            cause_detail={"c": 0.0032, "cosine": 1.0, "rel_l2": rel} if frozen else
                            {"cosine": 0.01, "uniformity": 0.64, "typical_abs_delta": rel})
            tensors.append(td)
        side = SideInfo("store@x", "store", layers, 0)
        reports.append(DiffReport(old=side, new=side, tensors=tensors, manifest_source="m", fail_on="drift"))
    return Timeline(title="runs/store", baseline="#0", names=[t.name for t in reports[0].tensors],
                    columns=[Column(f"#{j} step {100 * j}", 100 * j, {"loss": 2.0 / (j + 1)})
                             for j in range(snaps)], reports=reports)


def test_300_layers_by_50_snapshots_stays_a_few_hundred_kb():
    text = render_html(_timeline(300, 50))
    size = len(text.encode())
    assert size < 400 * 1024, size
    page = _parse(text)
    assert page.fetches == []
    fills = {p["fill"] for p in page.paths if p.get("fill", "none") != "none"}
    assert fills <= set(PALETTE) and len(fills) >= 6
    assert page.rows == 1 + len(ordered(_timeline(300, 50).final))


def test_names_are_escaped():
    tl = _timeline(3, 2)
    tl.reports[-1].tensors[0].name = '<img src=x onerror=alert(1)>'
    tl.names[0] = tl.reports[-1].tensors[0].name
    page = _parse(render_html(tl))
    assert page.fetches == [] and "img" not in page.tags


def test_buckets_are_decades():
    assert bucket(None) is None and bucket(float("nan")) is None
    assert [bucket(x) for x in (0.0, 5e-7, 5e-6, 5e-3, 0.5, 1.0, 1e9)] == [0, 0, 1, 4, 6, 7, 7]


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such store" in err
    assert main(["report", str(SAMPLES / "base.safetensors"), "-o", str(SAMPLES / "base.safetensors")]) == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_chromium_draws_the_page(tmp_path):
    out = tmp_path / "r.html"
    main(["report", str(SAMPLES / "history"), "-o", str(out)])
    png = tmp_path / "r.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,900", out.as_uri()], capture_output=True, timeout=120, check=False)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # a drawn page, not a blank one
