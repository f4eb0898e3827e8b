"""Hostile .pt files: every one refused with one line and exit 2, in bounded memory, without crashing,
and none of them changes how the next, valid, file is read.

The pickles here are written by hand, as an attacker would: a memo index of
2**27, a dict key nested two million deep (a C stack overflow when hashed),
BUILD on the stand-ins, a negative storage offset, a string shape, a 100 KB
integer. Each goes into a real ``torch.save`` zip and, where it applies, a
legacy-format file.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import pytest

from hostile_helpers import PROLOGUE, legacy_with_pickle, pt_with_pickle, run_cli
from reader_oracles import check, torch_tensors

torch = pytest.importorskip("torch")

from ckptdiff.errors import CkptError  # noqa: E402
from ckptdiff.formats import open_checkpoint  # noqa: E402
from ckptdiff.formats.safe_pickle import MAX_DEPTH, Opaque, PickleRefused, safe_unpickle, scan_only  # noqa: E402

MEMORY_MB = 300
KEY = b"X\x01\x00\x00\x00k"  # BINUNICODE 'k'
#: A real torch.save data.pkl for {"w": arange(4.)}, the base of the surgical edits below.
_TORCH_PKL = (b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00"
              b"storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07"
              b"QK\x00K\x04\x85q\x08K\x01\x85q\t\x89ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.")

HOSTILE = {
    # memo index far beyond the objects made: the C unpickler would allocate 2**27 slots (1 GiB)
    "memo_2_27": (PROLOGUE + b"N" + b"r" + (2 ** 27).to_bytes(4, "little") + b"0.", "memo entry 134217728"),
    "memo_binput": (PROLOGUE + b"Nq\xc8" + b".", "memo entry 200"),
    # a dict key that is a tuple nested 2,000,000 deep, by TUPLE1 and by MARK/TUPLE
    "deep_tuple1": (PROLOGUE + b")" + b"\x85" * 2_000_000 + b"K\x01s.", f"more than {MAX_DEPTH} deep"),
    "deep_marks": (PROLOGUE + b"(" * 1_000_000 + b")" + b"t" * 1_000_000 + b"K\x01s.", f"more than {MAX_DEPTH} deep"),
    # a 100 KB integer (LONG4): weights-only loading does not accept the opcode at all
    "long4": (PROLOGUE + KEY + b"\x8b" + (100_000).to_bytes(4, "little") + b"\x01" * 100_000 + b"s.",
              "opcode 139 (LONG4)"),
    "truncated": (_TORCH_PKL[:120], "truncated"),
}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, tuple[str, str]]:
    d = str(tmp_path_factory.mktemp("hostile"))
    out = {}
    for name, (pkl, why) in HOSTILE.items():
        out[f"zip-{name}"] = (pt_with_pickle(d, name, pkl), why)
        out[f"legacy-{name}"] = (legacy_with_pickle(d, f"legacy-{name}", pkl), why)
    return out


@pytest.fixture(scope="module")
def valid_pt(tmp_path_factory) -> str:
    p = str(tmp_path_factory.mktemp("valid") / "valid.pt")
    torch.manual_seed(0)
    torch.save({"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
                "h": torch.randn(2, 2).to(torch.bfloat16)}, p)
    return p


@pytest.mark.parametrize("case", ["zip-memo_2_27", "zip-deep_tuple1", "legacy-deep_marks", "zip-long4"])
def test_cli_refuses_with_one_line_in_bounded_memory(hostile_files, valid_pt, case):
    path, why = hostile_files[case]
    run = run_cli("diff", path, valid_pt)
    line = run.refused()
    assert why in line and os.path.basename(path) in line
    assert run.peak_mb < MEMORY_MB, f"{case}: peak {run.peak_mb:.0f} MB"


def test_snapshot_refuses_hostile_pickles_without_internal_error(hostile_files, tmp_path):
    store = str(tmp_path / "store")
    for case in ("zip-deep_tuple1", "zip-long4"):
        run = run_cli("snapshot", hostile_files[case][0], "--store", store)
        assert HOSTILE[case.removeprefix("zip-")][1] in run.refused()


def test_every_hostile_file_is_refused_in_process_and_the_next_valid_file_reads_exactly(hostile_files, valid_pt):
    for case, (path, why) in hostile_files.items():
        with pytest.raises(CkptError) as err:
            open_checkpoint(path)
        assert why in str(err.value), case
        assert check(valid_pt, torch_tensors) == "equal", f"after {case}"


def _edited(tmp_path, name: str, old: bytes, new: bytes) -> str:
    assert _TORCH_PKL.count(old) == 1
    return pt_with_pickle(str(tmp_path), name, _TORCH_PKL.replace(old, new))


@pytest.mark.parametrize("name, old, new", [
    ("negative_offset", b"QK\x00", b"QJ\xf6\xff\xff\xff"),           # storage offset -10: would read zip headers
    ("string_shape", b"K\x04\x85q\x08", b"X\x01\x00\x00\x004\x85q\x08"),  # shape ('4',)
    ("unknown_dtype", b"FloatStorage", b"FloatStorag_"),               # a storage class that does not exist
    ("past_storage", b"QK\x00", b"QK\x03"),                            # offset 3 of a 4-element storage, 4 elements
    ("storage_size", b"K\x04tq\x07", b"K\x09tq\x07"),                  # the pickle claims 9 elements, the file has 4
])
def test_invalid_rebuild_arguments_are_refused_like_torch(tmp_path, valid_pt, name, old, new):
    # ckptdiff hands these to torch, which refuses them; the CLI's one-line wording of torch's refusals is
    # tested with the other bad inputs (test_fmt_cli_errors).
    path = _edited(tmp_path, name, old, new)
    assert check(path, torch_tensors) == "refused"  # and torch agrees there is nothing to read
    with pytest.raises(Exception):  # noqa: B017 - torch's own words vary; that it refuses is the point
        torch.load(path, weights_only=True)
    assert check(valid_pt, torch_tensors) == "equal"


def test_build_on_a_stand_in_cannot_change_the_next_load(tmp_path, valid_pt):
    # BUILD (None, {'dtype': 'float32'}) on the UntypedStorage global: it used to rewrite a module-level object.
    pkl = (PROLOGUE + KEY + b"ctorch.storage\nUntypedStorage\n"
           + b"N}X\x05\x00\x00\x00dtypeX\x07\x00\x00\x00float32s\x86bs.")
    path = pt_with_pickle(str(tmp_path), "build", pkl)
    with pytest.raises(CkptError):
        open_checkpoint(path)  # torch refuses BUILD on a class; so does ckptdiff
    untyped = str(tmp_path / "untyped.pt")
    torch.save({"x": torch.arange(6, dtype=torch.int16).reshape(2, 3)}, untyped)
    assert check(untyped, torch_tensors) == "equal"
    assert check(valid_pt, torch_tensors) == "equal"


def test_duplicate_member_names_are_refused(tmp_path, valid_pt):
    import zipfile

    from hostile_helpers import replace_members

    with zipfile.ZipFile(valid_pt) as zf:
        prefix = zf.namelist()[0].split("/")[0]
        first = zf.read(f"{prefix}/data/0")
    dup = str(tmp_path / "dup.pt")
    # torch reads the first of two same-named members, a zip library the last: never choose, refuse
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        replace_members(valid_pt, dup, {}, extra=[(f"{prefix}/data/0", bytes(len(first)))])
    assert "appears twice" in run_cli("diff", dup, valid_pt).refused()


# ---- the interpreter on its own -----------------------------------------------------------

def test_interpreter_matches_pickle_on_plain_data():
    data = {"a": [1, -2, 2 ** 40, -(2 ** 70), 1.5, None, True, "ü", (1, (2, (3,)))], "b": {"c": []}, "e": ()}
    shared = [1, 2]
    data["s1"] = data["s2"] = shared  # memo GET: the same object twice
    raw = pickle.dumps(data, protocol=2)
    obj, opaque, end = safe_unpickle(raw, scan_only)
    assert obj == pickle.loads(raw) and opaque == [] and end == len(raw)
    assert obj["s1"] is obj["s2"]


def test_interpreter_depth_limit_is_exact():
    ok = PROLOGUE + b")" + b"\x85" * (MAX_DEPTH - 1) + b"K\x01s."
    obj, _, _ = safe_unpickle(ok, scan_only)
    assert len(obj) == 1
    with pytest.raises(PickleRefused, match="deep"):
        safe_unpickle(PROLOGUE + b")" + b"\x85" * MAX_DEPTH + b"K\x01s.", scan_only)


def test_unknown_globals_become_placeholders_and_the_rest_is_still_checked():
    evil = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00idh\x00\x85R."
    with pytest.raises(PickleRefused, match="memo entry 0"):  # GET of a never-stored entry, after the global
        safe_unpickle(evil, scan_only)
    obj, opaque, _ = safe_unpickle(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00id\x85R.", scan_only)
    assert isinstance(obj, Opaque) and opaque == ["os.system"]


@dataclasses.dataclass
class Item:
    """A stand-in for the dataclasses a DCP ``.metadata`` pickle holds."""

    name: str
    sizes: list


def test_protocol4_mode_reads_what_pickle_writes_by_default_with_the_same_bounds():
    data = {"f": frozenset({1, 2}), "b": b"\x00raw", "s": {3}, "t": (1, "x") * 3, "item": Item("w", [2, 3]),
            "long": "é" * 300}
    raw = pickle.dumps(data, protocol=5)

    class StandIn:  # what a reader's find_class would return for Item: a fresh, validating object
        def __init__(self, *args):
            assert args == ()
            self.state = None

        def __setstate__(self, state):
            assert set(state) == {"name", "sizes"}
            self.state = state

    def find_class(module, name):
        return StandIn if name == "Item" else Opaque(f"{module}.{name}")

    with pytest.raises(PickleRefused, match="opcode"):
        safe_unpickle(raw, find_class)  # torch's rules: protocol 5 is not weights-only
    obj, opaque, end = safe_unpickle(raw, find_class, protocol4=True)
    assert opaque == [] and end == len(raw)
    assert {k: v for k, v in obj.items() if k != "item"} == {k: v for k, v in data.items() if k != "item"}
    assert obj["item"].state == {"name": "w", "sizes": [2, 3]}
    deep = pickle.dumps({"k": 1}, protocol=4).replace(b"\x8c\x01k", b")" + b"\x85" * 10_000)
    with pytest.raises(PickleRefused, match="deep"):
        safe_unpickle(deep, find_class, protocol4=True)


def test_files_handed_to_torch_are_validated_first(tmp_path):
    # A big-endian archive goes to torch; its pickle must still pass the bounds before torch sees it.
    from hostile_helpers import replace_members

    base = pt_with_pickle(str(tmp_path), "deep", HOSTILE["deep_tuple1"][0])
    big = replace_members(base, str(tmp_path / "big.pt"), {"byteorder": b"big"})
    with pytest.raises(CkptError, match="deep"):
        open_checkpoint(big)
