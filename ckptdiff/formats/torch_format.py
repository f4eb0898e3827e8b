"""PyTorch .pt/.pth/.bin files (zip and legacy), loaded weights-only.

Security: ``torch.load(weights_only=True)`` uses torch's restricted
unpickler, which refuses any global outside a small allow-list, so a
checkpoint can never run code here. There is deliberately no opt-out.

Reference: ``torch.load(weights_only=True)`` itself, so the bytes compared
are torch's by construction. Stricter: torch's unpickler is plain Python on
top of C hashing and allocation, so a hostile pickle can still crash the
process under it (a dict key nested two million deep overflows the C stack
while it is hashed). Every pickle torch would interpret (the zip's data.pkl,
the five pickles at the start of a legacy file) is first run through
:mod:`.safe_pickle`'s bounded interpreter, and refused if it breaks a bound;
the zip layout is checked by :mod:`.torch_zip` before torch opens it.

Naming: tensors anywhere in nested dicts/lists/tuples get dotted names
(``optimizer.state.0.exp_avg``); everything else becomes metadata. The usual
wrappers are peeled off so the same weights get the same names whatever
script saved them: a top-level ``state_dict`` / ``model_state_dict`` /
``model`` entry (its tensors lose that prefix, other entries keep theirs),
and DDP's ``module.`` prefix when every model key has it. A top-level
``trainable_keys`` list becomes the checkpoint's embedded manifest.

torch is imported only inside these functions: ``import ckptdiff`` and the
CLI must stay cheap, and torch is an optional extra. Zip files made of plain
dense tensors do not need it at all: :mod:`.torch_zip` reads them directly
(same names, metadata and bytes) and steps aside for anything else.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ..checkpoint import Checkpoint, TensorRef, check_shape
from ..errors import CkptError, FormatError
from ..manifest import Manifest
from ._common import json_safe, map_file, open_binary, with_path

FORMAT = "torch"
#: Top-level keys whose value is the model's state_dict, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
DDP_PREFIX = "module."
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _import_torch(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise CkptError("reading PyTorch files needs torch: pip install torch "
                        "(or, in a ckptdiff checkout, pip install '.[torch]')", path) from None
    return torch


def open_torch(path: str | os.PathLike[str], legacy: bool = False) -> Checkpoint:
    p = os.fspath(path)
    if not legacy:
        # Most zip checkpoints are plain trees of dense tensors: read those
        # without importing torch (a second of start-up). Anything unusual
        # raises Unsupported and torch's own weights-only loader decides.
        from .torch_zip import Unsupported, open_torch_zip
        try:
            return open_torch_zip(p, _flatten_checkpoint, _finish)
        except Unsupported:
            pass
    else:
        _scan_legacy(p)
    torch = _import_torch(p)
    obj = _load(torch, p, legacy)
    tensors, metadata, trainable, extras = _flatten_checkpoint(torch, obj, p)

    refs: dict[str, TensorRef] = {}
    skipped: list[str] = []
    for name, t in tensors.items():
        ref = _tensor_ref(torch, name, t, p)
        if ref is None:
            skipped.append(f"{name} ({t.dtype}, {t.layout})")
        else:
            refs[name] = ref
    if skipped:
        metadata["skipped"] = skipped
    ckpt = _finish(p, refs, metadata, trainable, extras, fmt="torch-legacy" if legacy else FORMAT)
    # The tensors keep torch's mmap of the file alive; dropping them on close
    # lets it go as soon as no caller holds a view.
    ckpt.on_close(tensors.clear)
    return ckpt


#: torch's legacy format opens with five pickles: magic number, protocol, sys info, the object, storage keys.
LEGACY_PICKLES = 5
#: Modules whose globals a checkpoint's pickle may name; anything else is quoted when a legacy file is refused.
_FAMILIAR_MODULES = ("torch", "collections", "_codecs", "numpy", "builtins", "copyreg")


def _scan_legacy(path: str) -> None:
    """Validate a legacy file before torch reads it: bounded pickles, and storages that are all there.

    torch's legacy loader allocates every storage the object pickle names
    and then fills those listed after it; a storage named but never filled
    comes back as uninitialised memory (different bytes on every load), so
    each must be listed, and the raw storages must fill the rest of the file.
    """
    from .safe_pickle import PickleRefused, safe_unpickle, scan_only

    with open_binary(path) as f:
        mm = map_file(f, path)
    if mm is None:
        raise FormatError("file is empty (0 bytes)", path)
    named: dict[Any, Any] = {}
    foreign: list[str] = []

    def find_class(module: str, name: str) -> Any:
        if not module.startswith(_FAMILIAR_MODULES):
            foreign.append(f"{module}.{name}")
        return scan_only(module, name)

    def persistent_load(pid: Any) -> None:
        if type(pid) is tuple and len(pid) >= 5:
            named.setdefault(pid[2], pid[1])
        return None

    try:
        pos = 0
        for i in range(LEGACY_PICKLES):
            keys, _, pos = safe_unpickle(mm, find_class, persistent_load if i == 3 else None, start=pos)
        if type(keys) is not list or not all(type(k) is str for k in keys) or len(set(keys)) != len(keys):
            raise PickleRefused("the list of storage keys is not a list of distinct strings")
        missing = [k for k in named if k not in keys]
        if missing:
            raise PickleRefused(f"storage {str(missing[0])[:80]!r} is used but its bytes are not in the file")
        _check_legacy_storages(mm, pos, keys, named)
    except PickleRefused as e:
        if foreign:  # a plain pickle of arbitrary objects, not a checkpoint: say what it would have run
            raise FormatError(f"refused: the file's pickle references {foreign[0][:200]}; ckptdiff loads weights "
                              "only and never runs code from a checkpoint", path) from None
        raise FormatError(f"refused: {e}", path) from None
    finally:
        mm.close()


def _check_legacy_storages(mm: Any, pos: int, keys: list[str], named: dict[Any, Any]) -> None:
    """Each listed storage is an 8-byte element count and its bytes; together they end the file."""
    from .safe_pickle import Opaque, PickleRefused
    from ..dtypes import DTYPES, STORAGE_DTYPES

    for key in keys:
        stype = named.get(key)
        what = stype.what if isinstance(stype, Opaque) else ""
        dtype = STORAGE_DTYPES.get(what.removeprefix("torch."))
        if dtype is None:
            return  # a storage type the table does not know: torch judges the rest
        if pos + 8 > len(mm):
            raise PickleRefused(f"storage {key[:80]!r} is cut off (truncated file?)")
        count = int.from_bytes(mm[pos:pos + 8], "little", signed=True)
        pos += 8 + max(count, 0) * DTYPES[dtype].itemsize
        if count < 0 or pos > len(mm):
            raise PickleRefused(f"storage {key[:80]!r} is cut off (truncated file?)")
    if pos != len(mm):
        raise PickleRefused(f"{len(mm) - pos} bytes after the last storage")


def _finish(path: str, refs: dict[str, TensorRef], metadata: dict[str, Any], trainable: list[str] | None,
            extras: list[str], fmt: str = FORMAT) -> Checkpoint:
    """Build the Checkpoint from :func:`_flatten_checkpoint`'s results (shared by any loader of .pt trees).

    Tensors outside the model's state_dict (optimizer moments, step counters,
    EMA copies) are expected to change with training: in the embedded
    manifest they are buffers, not frozen weights, so a clean fine-tune saved
    with its optimizer reports no drift.
    """
    manifest = None
    if trainable is not None:
        buffers = [pat for key in extras for pat in (key, f"{key}.*")]
        manifest = Manifest.from_keys(trainable, buffers=buffers, source="embedded trainable_keys")
    return Checkpoint(path, fmt, refs, metadata, manifest, auxiliary=tuple(extras))


def _load(torch: Any, path: str, legacy: bool) -> Any:
    import pickle

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, mmap=not legacy, map_location="cpu")
    except pickle.UnpicklingError as e:
        msg = str(e)
        hit = _GLOBAL_RE.search(msg)
        if hit:
            raise CkptError(
                f"refused: the file's pickle references {hit.group(1)}; ckptdiff loads weights only "
                "and never runs code from a checkpoint", path) from None
        op = re.search(r"Unsupported operand (\d+)", msg)
        if op:
            raise FormatError(
                f"refused: the pickle uses opcode {op.group(1)}, which weights-only loading does not accept "
                "(not a PyTorch checkpoint?); ckptdiff never runs code from a checkpoint", path) from None
        first = _first_useful_line(msg)
        raise FormatError(f"refused by weights-only loading: {first}", path) from None
    except Exception as e:  # torch.load on a mangled file raises nearly anything (AssertionError, struct.error, ...)
        first = _first_useful_line(str(e)) or type(e).__name__
        if isinstance(e, EOFError) or "central directory" in first or "truncated" in first.lower():
            raise FormatError(f"corrupt or truncated PyTorch file ({first})", path) from None
        raise FormatError(f"cannot load PyTorch file ({type(e).__name__}: {first})", path) from None


def _numpy_globals() -> list[Any]:
    """NumPy constructors that training scripts leave in checkpoints (``best_acc =
    np.float64(...)``), allow-listed for the weights-only unpickler.

    They only build scalars, dtypes and arrays; the contents of an object
    array still go through the same restricted unpickler, so nothing here can
    run code. Both module spellings are listed: numpy 1.x pickles say
    ``numpy.core``, numpy 2.x ``numpy._core``.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list[Any] = [np.dtype, np.ndarray]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray.scalar, f"{mod}.scalar"))
        out.append((multiarray._reconstruct, f"{mod}._reconstruct"))
    # numpy >= 1.25 pickles a dtype through its class, e.g. numpy.dtypes.Float64DType
    dtypes_mod = getattr(np, "dtypes", None)
    if dtypes_mod is not None:
        out.extend(getattr(dtypes_mod, n) for n in dir(dtypes_mod) if n.endswith("DType") and n != "StringDType")
    return out


def _first_useful_line(msg: str) -> str:
    for line in msg.splitlines():
        line = line.strip()
        if line and not line.startswith(("Weights only load failed", "Please file an issue")):
            return line[:300]
    return msg.strip()[:300]


def _flatten_checkpoint(
    torch: Any, obj: Any, path: str,
) -> tuple[dict[str, Any], dict[str, Any], list[str] | None, list[str]]:
    """Dotted names for every tensor, metadata for everything else, the embedded
    trainable keys, and the top-level keys outside the model's state_dict that hold tensors."""
    tensors: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    trainable: list[str] | None = None
    extras: list[str] = []

    if isinstance(obj, Mapping):
        top = {str(k): v for k, v in obj.items()}
        wrapper = next((k for k in WRAPPER_KEYS if k in top and isinstance(top[k], Mapping)
                        and _has_tensor(torch, top[k])), None)
        model_part = top.pop(wrapper) if wrapper is not None else None
        raw_keys = top.pop("trainable_keys", None)
        if wrapper is not None:
            model_tensors: dict[str, Any] = {}
            inner_meta: dict[str, Any] = {}
            _walk(torch, model_part, "", model_tensors, inner_meta, path)
            metadata.update({f"{wrapper}.{k}": v for k, v in inner_meta.items()})
        else:
            # A flat state_dict: its top-level tensors are the model; nested
            # containers beside them (an optimizer state_dict, ...) are not.
            model_tensors = {k: v for k, v in top.items() if isinstance(v, torch.Tensor)}
            top = {k: v for k, v in top.items() if k not in model_tensors}
        strip = bool(model_tensors) and all(n.startswith(DDP_PREFIX) for n in model_tensors)
        if strip:
            model_tensors = {n[len(DDP_PREFIX):]: t for n, t in model_tensors.items()}
        tensors.update(model_tensors)
        others: dict[str, Any] = {}
        _walk(torch, top, "", others, metadata, path)
        # Containers beside an identified model part are training state
        # (optimizer, scheduler, ...). Without a model part, nested containers
        # may be the model itself, so nothing is set aside.
        if wrapper is not None or model_tensors:
            extras = [k for k, v in top.items() if isinstance(v, torch.Tensor) or _has_tensor(torch, v)]
        for n, t in others.items():
            if n in tensors:
                how = f"after unwrapping {wrapper!r}" if wrapper else "after stripping 'module.'"
                raise FormatError(f"two tensors are named {n!r} {how}", path)
            tensors[n] = t
        if raw_keys is not None:
            if not isinstance(raw_keys, (list, tuple)) or not all(isinstance(k, str) for k in raw_keys):
                raise FormatError("'trainable_keys' must be a list of tensor names", path)
            trainable = [k[len(DDP_PREFIX):] if strip and k.startswith(DDP_PREFIX) else k for k in raw_keys]
            metadata["trainable_keys"] = list(trainable)
    else:
        _walk(torch, obj, "", tensors, metadata, path)
        if "" in tensors:  # torch.save(tensor): one unnamed tensor
            tensors["tensor"] = tensors.pop("")
    return tensors, metadata, trainable, extras


def _has_tensor(torch: Any, obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if depth > 64:
        return False
    if isinstance(obj, Mapping):
        return any(_has_tensor(torch, v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(torch, v, depth + 1) for v in obj)
    return False


def _walk(torch: Any, obj: Any, prefix: str, tensors: dict[str, Any], metadata: dict[str, Any], path: str,
          depth: int = 0) -> None:
    if depth > 256:
        raise FormatError(f"nesting deeper than 256 levels at {prefix!r}", path)
    if isinstance(obj, torch.Tensor):
        if prefix in tensors:
            raise FormatError(f"two tensors are named {prefix!r} (a dotted key collides with a nested one)", path)
        tensors[prefix] = obj
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            _walk(torch, v, f"{prefix}.{k}" if prefix else str(k), tensors, metadata, path, depth + 1)
        return
    if isinstance(obj, (list, tuple)) and _has_tensor(torch, obj):
        for i, v in enumerate(obj):
            _walk(torch, v, f"{prefix}.{i}" if prefix else str(i), tensors, metadata, path, depth + 1)
        return
    metadata[prefix] = json_safe(obj)


def _tensor_ref(torch: Any, name: str, t: Any, path: str) -> TensorRef | None:
    """A zero-copy TensorRef over a torch tensor, or None for types the table cannot hold."""
    from ..dtypes import from_torch

    if t.layout != torch.strided or t.is_quantized or getattr(t, "is_nested", False) or t.is_complex():
        return None
    if t.device.type != "cpu":  # map_location='cpu' makes this unreachable; keep it honest
        return None
    try:
        dt = from_torch(t.dtype)
        shape = check_shape(name, tuple(t.shape))
    except CkptError as e:
        if "dtype" in e.message:
            return None
        raise with_path(e, path) from None
    return TensorRef(name, dt.name, shape, view=_viewer(torch, t), source=os.path.basename(path))


def _viewer(torch: Any, t: Any) -> Callable[[], memoryview]:
    def view() -> memoryview:
        src = t.detach()
        if src.is_conj() or src.is_neg():
            src = src.resolve_conj().resolve_neg()
        if not src.is_contiguous():
            src = src.contiguous()  # copied only now, when the bytes are asked for
        flat = src.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)
        return memoryview(flat.numpy())
    return view
