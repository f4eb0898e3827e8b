"""torch.distributed.checkpoint directories: real saves (1 and 2 ranks), torch's loader as the oracle, hostile metadata.

The two-rank saves (FSDP2 ``fully_shard``, DDP, a column-split tensor) come
from ``dcp_job.py``, run once per module with gloo on CPU; each test copies
what it alters.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ckptdiff.cli import main
from ckptdiff.formats import open_checkpoint, sniff
from fmt_helpers import write_hf_shards

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

JOB = os.path.join(os.path.dirname(__file__), "dcp_job.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> str:
    """The two-rank saves of dcp_job.py (about 15 s; a hang fails after 150 s).

    The job is started once more, in a fresh directory, if its first run
    fails: it only makes the test data, and torch's two-process start-up
    has failed once in a loaded full run and never when run again. Two
    failures fail every test that uses it, with the job's own error.
    """
    for _ in range(2):
        out = str(tmp_path_factory.mktemp("dcp2"))
        proc = subprocess.run([sys.executable, JOB, out], capture_output=True, text=True, timeout=150)
        if proc.returncode == 0:
            return out
    raise AssertionError(f"dcp_job.py failed twice:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")


def _model_and_optimizer() -> tuple[dict, dict]:
    """A small model after one AdamW step, its state as get_state_dict gives it (one process)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_((torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) % 5 - i) / 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.25)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return get_state_dict(model, opt)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[str, str]:
    """(DCP dir, safetensors file) of the same model + optimizer state, saved by one process."""
    import warnings

    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("dcp1")
    msd, osd = _model_and_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        dcp.save({"model": msd, "optim": osd, "epoch": 2}, checkpoint_id=str(out / "ckpt"))
    flat = {k: v.detach().clone() for k, v in msd.items()}
    flat.update({f"optim.state.{fqn}.{k}": v.clone() for fqn, st in osd["state"].items() for k, v in st.items()})
    save_file(flat, str(out / "flat.safetensors"))
    return str(out / "ckpt"), str(out / "flat.safetensors")


def _torch_oracle(dcp_dir: str, tmp_path) -> dict[str, bytes]:
    """What torch itself loads from the directory (dcp_to_torch_save), flattened by hand to dotted names."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    pt = str(tmp_path / f"oracle-{os.path.basename(dcp_dir)}.pt")
    dcp_to_torch_save(dcp_dir, pt)
    tree = torch.load(pt, weights_only=False)
    out: dict[str, bytes] = {}

    def walk(obj, prefix: str) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{prefix}.{i}")

    walk(tree.pop("model", {}), "")
    walk(tree, "")
    return out


def _diff_exit(old: str, new: str, capsys) -> tuple[int, str]:
    rc = main(["diff", old, new, "--no-progress", "--quiet"])
    return rc, capsys.readouterr().err


# -- real saves ---------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp2", "ddp", "tp"])
def test_two_rank_saves_diff_identical_to_the_same_weights_as_safetensors(two_ranks, kind, capsys):
    d = os.path.join(two_ranks, kind)
    assert sniff(d) == "dcp"
    assert _diff_exit(d, os.path.join(two_ranks, f"{kind}.safetensors"), capsys) == (0, "")
    assert _diff_exit(os.path.join(two_ranks, f"{kind}.safetensors"), d, capsys) == (0, "")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_fsdp2_save_diffs_identical_to_the_same_state_as_hf_shards(two_ranks, tmp_path, kind, capsys):
    from safetensors.torch import load_file

    flat = load_file(os.path.join(two_ranks, "fsdp2.safetensors"))
    index = write_hf_shards(str(tmp_path / kind), flat, kind, 3)
    for target in (index, str(tmp_path / kind)):
        assert _diff_exit(os.path.join(two_ranks, "fsdp2"), target, capsys) == (0, "")


@pytest.mark.distributed
def test_fsdp2_tensors_are_assembled_from_one_chunk_per_rank(two_ranks):
    with open_checkpoint(os.path.join(two_ranks, "fsdp2")) as ck:
        assert ck["0.weight"].source == "2 chunks" and ck["0.weight"].shape == (8, 6)
        assert ck["2.weight"].shape == (5, 8)  # 3 + 2 rows: uneven shards
    with open_checkpoint(os.path.join(two_ranks, "tp")) as ck:
        assert ck["tp.weight"].source == "2 chunks"  # split along columns: streamed row by row


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fsdp2", "ddp", "tp"])
def test_two_rank_tensors_equal_what_torch_loads(two_ranks, kind, tmp_path):
    expected = _torch_oracle(os.path.join(two_ranks, kind), tmp_path)
    with open_checkpoint(os.path.join(two_ranks, kind)) as ck:
        assert {n: ck[n].read() for n in ck} == expected
        if kind == "tp":
            assert ck.metadata["step"] == 3


def test_one_process_save_reads_as_torch_loads_it_and_diffs_identical(one_rank, tmp_path, capsys):
    d, flat = one_rank
    assert _diff_exit(d, flat, capsys) == (0, "")
    with open_checkpoint(d) as ck:
        assert {n: ck[n].read() for n in ck} == _torch_oracle(d, tmp_path)
        assert ck.auxiliary == ("optim",)  # optimizer state is training state, as in a .pt
        assert ck.metadata["optim.param_groups.0.lr"] == 0.25
        assert ck.metadata["epoch"] == 2
        assert ck.format == "dcp"


def test_a_stateful_app_container_is_peeled_like_a_wrapper(tmp_path, one_rank, capsys):
    """The DCP tutorial saves ``{"app": AppState(model, optimizer)}``: names come out as for a plain save."""
    import warnings

    from torch.distributed.checkpoint.stateful import Stateful

    msd, osd = _model_and_optimizer()

    class AppState(Stateful):
        def state_dict(self):
            return {"model": msd, "optim": osd}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    d = str(tmp_path / "app")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"app": AppState()}, checkpoint_id=d)
    with open_checkpoint(d) as ck:
        assert ck.auxiliary == ("optim",) and "0.weight" in ck
    assert _diff_exit(d, one_rank[1], capsys) == (0, "")


def test_optimizer_state_that_changes_is_not_drift(one_rank, tmp_path, capsys):
    """Same weights, different optimizer moments: with a manifest freezing everything, no drift."""
    from safetensors.torch import load_file, save_file

    d, flat = one_rank
    moved = load_file(flat)
    for k in moved:
        if k.startswith("optim.") and moved[k].ndim:
            moved[k] = moved[k] + 1
    other = str(tmp_path / "moved.safetensors")
    save_file(moved, other)
    manifest = tmp_path / "m.json"
    manifest.write_text('{"trainable": ["1.*"]}')
    assert main(["diff", other, d, "--manifest", str(manifest), "--quiet", "--no-progress"]) == 0


def test_safetensors_storage_layout_reads_like_the_torch_save_one(tmp_path, capsys):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    sd = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(3, dtype=torch.bfloat16)}
    d = str(tmp_path / "st")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = FileSystemWriter(d, serialization_format=SerializationFormat.SAFETENSORS)
        dcp.save({"model": sd}, storage_writer=writer)
    save_file(sd, str(tmp_path / "flat.safetensors"))
    assert _diff_exit(d, str(tmp_path / "flat.safetensors"), capsys) == (0, "")


# -- refused input ----------------------------------------------------------------------------

def _copy(two_ranks: str, kind: str, tmp_path) -> str:
    d = str(tmp_path / kind)
    shutil.copytree(os.path.join(two_ranks, kind), d)
    return d


def _rewrite_metadata(d: str, change) -> None:
    path = os.path.join(d, ".metadata")
    with open(path, "rb") as f:
        md = pickle.load(f)
    change(md)
    with open(path, "wb") as f:
        pickle.dump(md, f)


def _refused(d: str, capsys, *fragments: str) -> str:
    rc = main(["diff", d, d, "--no-progress", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in err, err
    return err


def _first_storage(md, fqn: str):
    return next(k for k in md.storage_data if k.fqn == fqn)


@pytest.mark.distributed
def test_a_gap_between_chunks_is_refused(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "fsdp2", tmp_path)
    _rewrite_metadata(d, lambda md: md.state_dict_metadata["model.0.weight"].chunks.pop())
    _refused(d, capsys, "'model.0.weight'", "cover 24 of 48 elements")


@pytest.mark.distributed
@pytest.mark.parametrize("row, message", [(2, "overlap"), (6, "outside the tensor")],
                         ids=["overlapping", "outside-the-tensor"])
def test_a_misplaced_chunk_is_refused(two_ranks, tmp_path, capsys, row, message):
    d = _copy(two_ranks, "fsdp2", tmp_path)

    def move_second_chunk(md) -> None:
        chunks = md.state_dict_metadata["model.0.weight"].chunks
        chunks[1] = dataclasses.replace(chunks[1], offsets=torch.Size([row, 0]))
    _rewrite_metadata(d, move_second_chunk)
    _refused(d, capsys, message)


@pytest.mark.distributed
@pytest.mark.parametrize("where", ["../evil.distcp", "/etc/hostname"])
def test_a_data_file_outside_the_directory_is_refused(two_ranks, tmp_path, capsys, where):
    d = _copy(two_ranks, "fsdp2", tmp_path)
    shutil.copy(os.path.join(d, "__0_0.distcp"), tmp_path / "evil.distcp")

    def escape(md) -> None:
        key = _first_storage(md, "model.0.weight")
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path=where)
    _rewrite_metadata(d, escape)
    _refused(d, capsys, repr(where))


@pytest.mark.distributed
def test_a_symlinked_data_file_resolving_outside_is_refused(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "fsdp2", tmp_path)
    shutil.move(os.path.join(d, "__1_0.distcp"), tmp_path / "elsewhere.distcp")
    os.symlink(tmp_path / "elsewhere.distcp", os.path.join(d, "__1_0.distcp"))
    _refused(d, capsys, "resolves outside the directory")


@pytest.mark.distributed
def test_a_byte_range_past_the_end_of_its_file_is_refused(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "fsdp2", tmp_path)

    def past_end(md) -> None:
        key = _first_storage(md, "model.0.weight")
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], length=1 << 40)
    _rewrite_metadata(d, past_end)
    _refused(d, capsys, "lie outside")


@pytest.mark.distributed
def test_a_truncated_data_file_is_refused(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "fsdp2", tmp_path)
    path = os.path.join(d, "__1_0.distcp")
    os.truncate(path, os.path.getsize(path) // 2)
    _refused(d, capsys, "lie outside")


@pytest.mark.distributed
def test_transforms_are_refused_not_misread(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "fsdp2", tmp_path)

    def compressed(md) -> None:
        key = _first_storage(md, "model.0.weight")
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], transform_descriptors=["zstd"])
    _rewrite_metadata(d, compressed)
    _refused(d, capsys, "transforms ['zstd']")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.distributed
def test_metadata_that_would_run_code_is_refused_without_running_it(two_ranks, tmp_path, capsys, monkeypatch):
    d = _copy(two_ranks, "ddp", tmp_path)
    monkeypatch.chdir(tmp_path)
    _rewrite_metadata(d, lambda md: md.storage_data.update({"x": _Payload()}))
    _refused(d, capsys, "refused", "system")
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.distributed
def test_garbage_metadata_is_one_line(two_ranks, tmp_path, capsys):
    d = _copy(two_ranks, "ddp", tmp_path)
    with open(os.path.join(d, ".metadata"), "wb") as f:
        f.write(b"\x80\x04\x95" + os.urandom(64))
    _refused(d, capsys, ".metadata")


@pytest.mark.distributed
@pytest.mark.parametrize("part", ["__0_0.distcp", ".metadata"])
def test_one_file_of_the_directory_is_refused_naming_the_directory(two_ranks, capsys, part):
    d = os.path.join(two_ranks, "fsdp2")
    err = _refused(os.path.join(d, part), capsys, "pass its directory instead")
    assert err.endswith(os.path.abspath(d))


@pytest.mark.distributed
def test_reading_streams_chunks_not_the_whole_tensor(two_ranks):
    """A column-split tensor comes out in runs of one chunk row each, re-cut to the asked size."""
    with open_checkpoint(os.path.join(two_ranks, "tp")) as ck:
        ref = ck["tp.weight"]
        assert ref.view is None and ref.pieces is not None
        runs = [bytes(p) for p in ref.pieces()]
        assert [len(r) for r in runs] == [6 * 4, 5 * 4] * 6
        whole = np.frombuffer(b"".join(runs), dtype=np.float32).reshape(6, 11)
        assert whole.tolist() == (np.arange(66, dtype=np.float32).reshape(6, 11) / 4).tolist()
        assert b"".join(bytes(c) for c in ref.chunks(20)) == b"".join(runs)


def test_tensors_of_dtypes_outside_the_table_are_listed_as_skipped(tmp_path):
    import warnings

    d = str(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(4, dtype=torch.int16), "z": torch.zeros(3, dtype=torch.complex64)},
                 checkpoint_id=d)
    with open_checkpoint(d) as ck:
        assert list(ck) == ["w"] and ck["w"].numpy().tolist() == [0, 1, 2, 3]
        assert ck.metadata["skipped"] == ["z"]


@pytest.mark.distributed
@pytest.mark.parametrize("target", [".metadata", "__1_0.distcp"])
def test_mangled_files_are_read_or_refused_never_a_crash(two_ranks, tmp_path, target):
    """Byte flips anywhere in a real .metadata or data file: reading works or raises CkptError (one line)."""
    from ckptdiff.errors import CkptError

    d = _copy(two_ranks, "fsdp2", tmp_path)
    path = os.path.join(d, target)
    with open(path, "rb") as f:
        good = f.read()
    rng = np.random.default_rng(0)
    for _ in range(150):
        bad = bytearray(good)
        for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 4))):
            bad[pos] = int(rng.integers(0, 256))
        with open(path, "wb") as f:
            f.write(bad)
        try:
            with open_checkpoint(d) as ck:
                for ref in ck.values():
                    ref.read()
        except CkptError as e:
            assert "\n" not in str(e)
