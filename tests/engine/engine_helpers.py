"""What the engine tests share: a pair of real safetensors files on disk."""

from __future__ import annotations

from safetensors.numpy import save_file


def write_pair(tmp_path, a, b, name="m"):  # noqa: ANN001, ANN201
    pa, pb = tmp_path / f"{name}.a.safetensors", tmp_path / f"{name}.b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return str(pa), str(pb)
