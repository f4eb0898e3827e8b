"""Hostile and extreme containers: zip layouts two readers could read differently, safetensors
polyglots, deflate bombs, deeply nested HDF5, and error lines that quote 100,000-character inputs."""

from __future__ import annotations

import json
import os
import struct
import zipfile

import numpy as np
import pytest

from fmt_helpers import raw_safetensors, write_safetensors
from hostile_helpers import replace_members, run_cli
from reader_oracles import check, safetensors_tensors

from ckptdiff.errors import CkptError
from ckptdiff.formats import open_checkpoint, sniff
from ckptdiff.textsafe import MAX_LINE, MAX_QUOTED, one_line

MEMORY_MB = 300


# ---- zip .pt layouts -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pt(tmp_path_factory) -> str:
    torch = pytest.importorskip("torch")
    p = str(tmp_path_factory.mktemp("pt") / "m.pt")
    torch.save({"w": torch.arange(8, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)}, p)
    return p


def _refused(path: str, *words: str) -> None:
    with pytest.raises(CkptError) as err:
        open_checkpoint(path)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_bytes_before_the_first_member_are_refused(pt, tmp_path):
    # What a lone DCP .distcp or a polyglot looks like to a zip library that finds the directory from the end.
    bad = tmp_path / "prefixed.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 60 + open(pt, "rb").read())
    with pytest.raises(CkptError, match="before the first member|disagree"):  # offsets no longer add up
        open_checkpoint(str(bad))
    # Offsets that do add up still leave the prefix unexplained.
    rewritten = replace_members(pt, str(tmp_path / "plain.pt"), {})
    fixed = tmp_path / "prefixed2.pt"
    raw = open(rewritten, "rb").read()
    eocd = raw.rindex(b"PK\x05\x06")
    n_cd, cd_size, cd_off = struct.unpack_from("<HII", raw, eocd + 10)
    patched = bytearray(raw)
    struct.pack_into("<I", patched, eocd + 16, cd_off + 64)
    pos = cd_off
    while patched[pos:pos + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", patched, pos + 28)
        struct.pack_into("<I", patched, pos + 42, struct.unpack_from("<I", patched, pos + 42)[0] + 64)
        pos += 46 + n + e + c
    fixed.write_bytes(b"PK\x03\x04" + b"\0" * 60 + bytes(patched))
    _refused(str(fixed), "before the first member")


def test_bytes_between_members_and_after_the_end_record_are_refused(pt, tmp_path):
    raw = open(pt, "rb").read()
    with zipfile.ZipFile(pt) as zf:
        second = sorted(i.header_offset for i in zf.infolist())[1]
    gap = tmp_path / "gap.pt"
    gap.write_bytes(raw[:second] + b"JUNK" + raw[second:])
    with pytest.raises(CkptError):
        open_checkpoint(str(gap))
    tail = tmp_path / "tail.pt"
    tail.write_bytes(raw + b"appended")
    _refused(str(tail), "after its end record")


def test_compressed_members_are_refused(pt, tmp_path):
    comp = str(tmp_path / "comp.pt")
    with zipfile.ZipFile(pt) as zin, zipfile.ZipFile(comp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    _refused(comp, "compressed")


def test_local_header_disagreeing_with_the_directory_is_refused(pt, tmp_path):
    raw = bytearray(open(pt, "rb").read())
    with zipfile.ZipFile(pt) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    name_at = info.header_offset + 30
    raw[name_at + len(info.filename) - 1] = ord("9")  # local name .../data/9, central .../data/0
    bad = tmp_path / "local.pt"
    bad.write_bytes(bytes(raw))
    _refused(str(bad), "local header disagrees")


def test_overlapping_members_are_refused(pt, tmp_path):
    # Two central entries pointing at one local header: the second member's bytes are the first's.
    raw = bytearray(open(pt, "rb").read())
    with zipfile.ZipFile(pt) as zf:
        infos = zf.infolist()
        start_dir = zf.start_dir
    target = next(i for i in infos if i.filename.endswith("data/0")).header_offset
    pos = start_dir
    while raw[pos:pos + 4] == b"PK\x01\x02":
        n, e, c = struct.unpack_from("<HHH", raw, pos + 28)
        if raw[pos + 46:pos + 46 + n].endswith(b"data/1"):
            struct.pack_into("<I", raw, pos + 42, target)
        pos += 46 + n + e + c
    bad = tmp_path / "overlap.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CkptError):
        open_checkpoint(str(bad))


def test_a_valid_file_after_the_hostile_archives_is_still_read_exactly(pt):
    torch = pytest.importorskip("torch")
    ck = open_checkpoint(pt)
    try:
        assert ck["w"].read() == torch.arange(8, dtype=torch.float32).numpy().tobytes()
    finally:
        ck.close()


# ---- safetensors: as the reference library decides -------------------------------------------

def test_safetensors_trailing_bytes_are_refused_as_the_reference_does(tmp):
    path = write_safetensors(tmp("a.safetensors"), {"w": np.arange(4, dtype=np.float32)})
    with open(path, "ab") as f:
        f.write(b"<polyglot tail>")
    _refused(path, "after the last tensor's data")
    with pytest.raises(Exception):  # noqa: B017 - the reference refuses it too
        safetensors_tensors(path)
    assert "after the last tensor" in run_cli("diff", path, path).refused()


def test_safetensors_gaps_are_refused_as_the_reference_does(tmp):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    path = raw_safetensors(tmp("gap.safetensors"), header, bytes(12))
    _refused(path, "belong to no tensor")
    assert check(path, safetensors_tensors) == "refused"


@pytest.mark.parametrize("pad", [b" \n\t", b"\r\n" + b" " * 5000])
def test_whitespace_padded_headers_are_accepted_as_the_reference_does(tmp, pad):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "i": np.arange(3, dtype=np.int64)}
    src = write_safetensors(tmp("src.safetensors"), arrays)
    raw = open(src, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = pad + raw[8:8 + n].strip() + pad
    path = tmp("padded.safetensors")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    assert sniff(path) == "safetensors"
    assert check(path, safetensors_tensors) == "equal"


def test_a_640_byte_safetensors_header_is_not_taken_for_a_pickle(tmp):
    # 640 = 0x280: the length's first two bytes, 0x80 0x02, are also how a pickle starts.
    body = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = body + b" " * (640 - len(body))
    path = tmp("x.safetensors")
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + bytes(8))
    assert open(path, "rb").read(2) == b"\x80\x02"
    assert sniff(path) == "safetensors" and check(path, safetensors_tensors) == "equal"


# ---- resource bounds -----------------------------------------------------------------------

def test_npz_deflate_bomb_is_refused_fast_in_bounded_memory(tmp):
    # 128 MiB of zeros in ~130 KB: a valid array, but no checkpoint compresses 1000-fold.
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (32 << 20,)})
    path = tmp("bomb.npz")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("w.npy", "w", force_zip64=True) as m:
        m.write(buf.getvalue())
        zeros = bytes(8 << 20)
        for _ in range(16):
            m.write(zeros)
    assert os.path.getsize(path) < 1 << 20
    run = run_cli("diff", path, path)
    assert "deflate bomb" in run.refused()
    assert run.peak_mb < MEMORY_MB


def test_hdf5_groups_nested_2000_deep_are_read(tmp):
    h5py = pytest.importorskip("h5py")
    path = tmp("deep.h5")
    with h5py.File(path, "w") as f:
        g = f
        for _ in range(2000):
            g = g.create_group("g")
        g.create_dataset("w", data=np.arange(3, dtype=np.float32))
        f["a"] = np.ones(2, np.int16)
        f["link"] = h5py.SoftLink("/a")  # not followed: the dataset is named by its hard link only
    ck = open_checkpoint(path)
    try:
        assert list(ck) == ["a", ".".join(["g"] * 2000) + ".w"]
        assert ck[".".join(["g"] * 2000) + ".w"].read() == np.arange(3, dtype=np.float32).tobytes()
    finally:
        ck.close()


def test_the_open_deadline_names_what_was_slow(tmp):
    torch = pytest.importorskip("torch")
    path = tmp("slow.pt")
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)  # needs torch: > 0.05 s
    run = run_cli("diff", path, path, env={"CKPTDIFF_OPEN_TIMEOUT": "0.05"})
    line = run.refused()
    assert "opening this torch-legacy file" in line and "CKPTDIFF_OPEN_TIMEOUT" in line


# ---- error lines quote bounded excerpts -------------------------------------------------------

def test_an_unknown_100000_character_store_ref_is_quoted_in_bounded_length(tmp):
    store = tmp("store")
    assert run_cli("init", store).rc == 0
    ref = "r" * 100_000
    line = run_cli("diff", f"{store}@{ref}", f"{store}@{ref}").refused()
    assert len(line) < MAX_LINE + 100 and "characters]" in line
    assert "r" * (MAX_QUOTED + 1) not in line


def test_one_line_clips_every_long_word_and_the_whole_line():
    assert one_line("short message: a b c") == "short message: a b c"
    clipped = one_line("tensor " + "x" * 10_000 + " is bad\nreally")
    assert "\n" not in clipped and clipped.startswith("tensor xxx") and clipped.endswith("is bad\\nreally")
    assert "[9800 characters]" in clipped
    many = one_line(" ".join(["word"] * 10_000))
    assert len(many) <= MAX_LINE + 40
