"""A PEFT adapter directory, opened as one checkpoint.

``save_pretrained`` on a PEFT model writes ``adapter_config.json`` beside
``adapter_model.safetensors`` (or ``adapter_model.bin`` with
``safe_serialization=False``). The tensors are read by the reader their
content calls for (a ``.bin`` may be a torch zip, a legacy pickle or even a
safetensors file), so the safetensors case stays torch-free. The config is
untrusted JSON like any header: bounded in size, and kept as metadata
(``metadata["adapter_config"]``) for whoever needs it, e.g. the LoRA merge
check (:mod:`ckptdiff.lora`).
"""

from __future__ import annotations

import os
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import CkptError, FormatError
from ._common import json_safe, small_json

CONFIG_NAME = "adapter_config.json"
#: The weight files PEFT writes, in the order PEFT itself prefers them.
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
FORMAT = "peft-adapter"
#: An adapter config is a few kB; anything near this is not one.
MAX_CONFIG_BYTES = 16 << 20


def is_adapter_dir(path: str) -> bool:
    """True when ``path`` is a directory holding ``adapter_config.json``."""
    return os.path.isfile(os.path.join(path, CONFIG_NAME))


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``directory``: a JSON object, or CkptError."""
    d = os.fspath(directory)
    path = os.path.join(d, CONFIG_NAME)
    if not os.path.isdir(d):
        raise CkptError("is not a directory (a PEFT adapter is a directory with adapter_config.json)"
                        if os.path.exists(d) else "no such file or directory", d)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CkptError(f"not a PEFT adapter directory: no {CONFIG_NAME}", d) from None
    except OSError as e:
        raise CkptError(f"cannot read the adapter config: {e.strerror or e}", path) from None
    config = small_json(raw, MAX_CONFIG_BYTES, "adapter config", path)
    if not isinstance(config, dict):
        raise FormatError("adapter config is not a JSON object", path)
    return config


def open_peft_adapter(directory: str | os.PathLike[str]) -> Checkpoint:
    """Open a PEFT adapter directory: its tensors under their saved names, its config as metadata."""
    d = os.fspath(directory)
    config = read_adapter_config(d)
    weights = next((os.path.join(d, n) for n in WEIGHT_NAMES if os.path.isfile(os.path.join(d, n))), None)
    if weights is None:
        raise CkptError(f"PEFT adapter directory has {CONFIG_NAME} but neither {' nor '.join(WEIGHT_NAMES)}", d)
    from . import open_checkpoint  # local: this module is itself imported by the package's resolver

    inner = open_checkpoint(weights)
    metadata = dict(inner.metadata)
    metadata["adapter_config"] = json_safe(config)
    metadata["adapter_weights"] = os.path.basename(weights)
    ckpt = Checkpoint(d, FORMAT, dict(inner.tensors), metadata)
    ckpt.on_close(inner.close)
    return ckpt


__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHT_NAMES", "is_adapter_dir", "open_peft_adapter", "read_adapter_config"]
