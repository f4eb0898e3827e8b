"""What ``log`` shows per snapshot, computed from entry hashes alone.

Every comparison here is hash against hash, so a log over hundreds of
snapshots of a multi-GB model reads no blob: "changed vs parent" counts
names whose signature differs, appeared or vanished; "drift" counts frozen
tensors that moved since the first snapshot (the baseline a fine-tune
started from), as :mod:`ckptdiff.policy` decides for a diff of the two
snapshots at zero tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import policy
from ..manifest import Manifest
from .model import SnapshotInfo


@dataclass
class LogRow:
    info: SnapshotInfo
    #: Tensors changed, added or removed vs the parent; None for a root snapshot.
    changed: int | None
    #: Frozen tensors whose hash differs from the first snapshot's; None without a manifest.
    drift: int | None
    drift_names: list[str] = field(default_factory=list)
    manifest_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.info.to_dict()
        d.pop("manifest", None)
        d["changed_vs_parent"] = self.changed
        d["drift_vs_first"] = self.drift
        d["drifted_tensors"] = list(self.drift_names)
        d["has_manifest"] = self.manifest_source is not None
        return d


def effective_manifest(sid: str, by_id: Mapping[str, SnapshotInfo]) -> Manifest | None:
    """The snapshot's own manifest, else its nearest ancestor's."""
    seen: set[str] = set()
    cur: str | None = sid
    while cur is not None and cur not in seen and cur in by_id:
        seen.add(cur)
        info = by_id[cur]
        if info.manifest is not None:
            return info.manifest
        cur = info.parent
    return None


def roles_manifest(sid: str, by_id: Mapping[str, SnapshotInfo], base: str | None = None) -> Manifest | None:
    """The manifest that decides a snapshot's roles (compared with ``base``, by default itself).

    :func:`effective_manifest` chosen and completed by the policy as for a
    diff of the two opened snapshots: NEW's manifest else OLD's, with the
    training state recorded beside the model (``auxiliary``) as buffers.
    """
    info = by_id.get(sid)
    old = by_id.get(base) if base is not None else info
    aux = (old.auxiliary if old is not None else ()) + (info.auxiliary if info is not None else ())
    old_man = effective_manifest(base, by_id) if base is not None else None
    return policy.pair_manifest(None, old_man, effective_manifest(sid, by_id), aux)


def changed_between(old: Mapping[str, str], new: Mapping[str, str]) -> int:
    n = sum(1 for k, h in new.items() if old.get(k) != h)
    return n + sum(1 for k in old if k not in new)


def drifted(first: Mapping[str, str], cur: Mapping[str, str], manifest: Manifest) -> list[str]:
    """Frozen tensors of the baseline that moved or vanished (the policy's drift, from signatures)."""
    return policy.signature_verdicts(first, cur, manifest)[0]


def build_log(infos: Sequence[SnapshotInfo], hashes: Mapping[str, Mapping[str, str]]) -> list[LogRow]:
    """One LogRow per snapshot; ``hashes`` maps snapshot id -> {tensor name: hash or any
    string that is equal exactly when the tensors are (``Store.signatures``)}."""
    by_id = {i.id: i for i in infos}
    first = hashes.get(infos[0].id, {}) if infos else {}
    rows = []
    for info in infos:
        cur = hashes.get(info.id, {})
        parent = hashes.get(info.parent) if info.parent is not None else None
        changed = None if parent is None else changed_between(parent, cur)
        man = roles_manifest(info.id, by_id, infos[0].id)
        names = drifted(first, cur, man) if man is not None else []
        rows.append(LogRow(info, changed, None if man is None else len(names), names,
                           None if man is None else (man.source or "manifest")))
    return rows


__all__ = ["LogRow", "build_log", "effective_manifest", "roles_manifest", "changed_between", "drifted"]
