"""Every Hugging Face shard layout, the index file given as the path, and DCP, all diffing identical.

The same weights (every dtype the formats share, odd shapes, a 0-d tensor)
are written as one safetensors file, a sharded safetensors directory, a
sharded ``.bin`` directory (torch zips, as ``save_pretrained(...,
safe_serialization=False)`` writes them) and a torch.distributed.checkpoint
directory; any two must diff as bitwise identical, exit 0.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from ckptdiff.cli import main
from ckptdiff.formats import open_checkpoint, sniff
from fmt_helpers import write_hf_index, write_hf_shards

torch = pytest.importorskip("torch")


def _weights() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(11, 6, generator=g),
        "layers.0.attn.weight": torch.randn(6, 6, generator=g).to(torch.bfloat16),
        "layers.0.attn.bias": torch.randn(6, generator=g).to(torch.float16),
        "layers.1.mlp.weight": torch.randn(12, 6, generator=g),
        "norm.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "head.mask": torch.arange(5) % 2 == 0,
    }


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, str]:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("layouts")
    sd = _weights()
    out = {"safetensors": str(root / "model.safetensors")}
    save_file(sd, out["safetensors"])
    out["st-index"] = write_hf_shards(str(root / "st"), sd, "safetensors", 3)
    out["st-dir"] = str(root / "st")
    out["bin-index"] = write_hf_shards(str(root / "bin"), sd, "bin", 2)
    out["bin-dir"] = str(root / "bin")
    out["dcp"] = str(root / "dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, checkpoint_id=out["dcp"])
    return out


PAIRS = [("safetensors", other) for other in ("st-index", "st-dir", "bin-index", "bin-dir", "dcp")] + \
        [("bin-dir", "dcp"), ("st-index", "bin-index")]


@pytest.mark.parametrize("old,new", PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_every_layout_diffs_identical(layouts, old, new, capsys):
    assert main(["diff", layouts[old], layouts[new], "--quiet", "--no-progress"]) == 0, capsys.readouterr().err
    assert main(["diff", layouts[new], layouts[old], "--quiet", "--no-progress"]) == 0


def test_bin_shards_read_with_their_names_dtypes_and_bytes(layouts):
    expected = _weights()
    assert sniff(layouts["bin-dir"]) == sniff(layouts["bin-index"]) == "safetensors-sharded"
    with open_checkpoint(layouts["bin-index"]) as ck:
        assert ck.format == "torch-sharded"
        assert ck.metadata["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
        assert sorted(ck) == sorted(expected)
        for name, t in expected.items():
            assert ck[name].shape == tuple(t.shape)
            assert ck[name].read() == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_safetensors_index_is_preferred_when_both_exist(layouts, tmp_path):
    import shutil

    d = tmp_path / "both"
    shutil.copytree(layouts["st-dir"], d)
    for f in os.listdir(layouts["bin-dir"]):
        shutil.copy(os.path.join(layouts["bin-dir"], f), d)
    with open_checkpoint(str(d)) as ck:
        assert ck.format == "safetensors-sharded"
        assert all(s.endswith(".safetensors") for s in ck.metadata["shards"])


@pytest.mark.parametrize("shard,message", [
    ("../outside.bin", "points outside the directory"),
    ("/etc/hostname", "is an absolute path"),
    ("missing.bin", "listed in the index is missing"),
])
def test_a_bin_index_pointing_elsewhere_is_refused(tmp_path, capsys, shard, message):
    d = tmp_path / "bad"
    d.mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "outside.bin")
    index = write_hf_index(str(d), "pytorch_model.bin.index.json", {"w": shard}, 8)
    for target in (str(d), index):
        assert main(["diff", target, target, "--quiet", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_a_shard_that_is_not_a_tensor_file_is_refused(tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    np.save(d / "w.npy", np.zeros(2, np.float32))
    write_hf_index(str(d), "pytorch_model.bin.index.json", {"w": "w.npy"}, 8)
    assert main(["diff", str(d), str(d), "--quiet", "--no-progress"]) == 2
    assert "shards must be safetensors or PyTorch files" in capsys.readouterr().err
