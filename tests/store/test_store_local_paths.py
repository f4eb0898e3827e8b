"""Store paths that are URLs are refused with one line, never turned into a local ``s3:`` directory."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckptdiff.cli import main
from ckptdiff.errors import CkptError
from ckptdiff.localpath import url_scheme
from ckptdiff.store import Store

URLS = ["s3://bucket/runs/store", "gs://bucket/store", "https://example.com/store", "hf://org/repo",
        "file:///tmp/store"]


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("command", [
    ["init", "{url}"],
    ["snapshot", "{ckpt}", "--store", "{url}"],
    ["log", "{url}"],
    ["verify", "{url}"],
    ["gc", "{url}"],
    ["show", "{url}@latest"],
    ["diff", "{url}@first", "{url}@latest"],
    ["diff", "{ckpt}", "{url}@latest"],
], ids=lambda c: c[0] if isinstance(c, list) else None)
def test_every_command_refuses_a_url_store_in_one_line(tmp_path, monkeypatch, capsys, command, url):
    from safetensors.numpy import save_file

    monkeypatch.chdir(tmp_path)
    save_file({"w": np.zeros(3, dtype=np.float32)}, "w.safetensors")
    argv = [a.format(url=url, ckpt="w.safetensors") for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "URL" in err and url_scheme(url) + "://" in err, err
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]  # nothing like ./s3: was made


def test_the_api_refuses_a_url_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (lambda: Store.init("s3://b/s"), lambda: Store.open("gs://b/s", create=True)):
        with pytest.raises(CkptError, match="local filesystem"):
            call()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path,scheme", [("s3://b", "s3"), ("GS://b", "gs"), ("runs/store", None),
                                         ("C:\\runs\\store", None), ("runs/s3://x", None), ("a+b.c-d://x", "a+b.c-d")])
def test_url_scheme_recognises_urls_only(path, scheme):
    assert url_scheme(path) == scheme
