"""The trainable-key manifest: which tensors were meant to move.

A manifest is ``{"trainable": [patterns], "frozen": [patterns], "buffers": [patterns]}``
(all optional), each pattern an fnmatch glob on the full tensor name (an exact
name matches itself). It can come from a JSON file, from a checkpoint that
embeds ``trainable_keys``, or be derived by the training hook from the live
model and optimizer.

Roles: ``trainable`` (expected to change; a bitwise-identical one is *stale*),
``frozen`` (must not change; any change beyond tolerance is *drift*),
``buffer`` (non-parameter state of a trained module, e.g. BatchNorm running
stats: allowed to change, never stale) and ``unknown`` (no manifest).

Resolution, when several patterns match one name: an exact name beats any
glob; otherwise the most specific glob wins (the one with the most literal,
non-wildcard characters); on a tie ``frozen`` wins, because reporting a
possible drift is cheaper than missing one. With only ``trainable`` given,
every other tensor is frozen.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

from .errors import CkptError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time (see docs/performance.md)
if TYPE_CHECKING:
    from typing import Any

ROLES = ("trainable", "frozen", "buffer", "unknown")
_KEYS = ("trainable", "frozen", "buffers")
_ROLE_OF_KEY = {"trainable": "trainable", "frozen": "frozen", "buffers": "buffer"}
# On equal specificity the earlier key wins: frozen first (conservative).
_TIE_ORDER = {"frozen": 0, "buffers": 1, "trainable": 2}
#: A glob's wildcards: ``[...]`` sets, ``*`` and ``?``.
_WILDCARDS = r"\[[^\]]*\]|[*?]"


def _is_glob(p: str) -> bool:
    return any(c in p for c in "*?[")


def _specificity(p: str) -> int:
    return len(re.sub(_WILDCARDS, "", p))  # compiled on first use (re caches it), not at every start-up


class Manifest:
    """Immutable and hashable, compared by its patterns and ``source`` (a frozen dataclass's
    contract, written out: the ``dataclasses`` module is a tenth of a small diff's start-up)."""

    trainable: tuple[str, ...]
    frozen: tuple[str, ...]
    buffers: tuple[str, ...]
    #: Where it came from, for messages ("manifest.json", "embedded trainable_keys", "hook").
    source: str
    #: name -> role, filled as names are asked for (not compared, hashed or shown).
    _cache: dict[str, str]

    def __init__(self, trainable: Iterable[str] = (), frozen: Iterable[str] = (), buffers: Iterable[str] = (),
                 source: str = "", _cache: dict[str, str] | None = None) -> None:
        init = object.__setattr__
        init(self, "trainable", tuple(trainable))
        init(self, "frozen", tuple(frozen))
        init(self, "buffers", tuple(buffers))
        init(self, "source", source)
        init(self, "_cache", {} if _cache is None else _cache)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def _key(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
        return (self.trainable, self.frozen, self.buffers, self.source)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Manifest(trainable={self.trainable!r}, frozen={self.frozen!r}, buffers={self.buffers!r}, "
                f"source={self.source!r})")

    def role(self, name: str) -> str:
        """``trainable``, ``frozen`` or ``buffer`` for this tensor name."""
        hit = self._cache.get(name)
        if hit is None:
            hit = self._cache[name] = self._resolve(name)
        return hit

    def _resolve(self, name: str) -> str:
        for key in ("frozen", "buffers", "trainable"):
            if name in getattr(self, key):
                return _ROLE_OF_KEY[key]
        best: tuple[int, int] | None = None
        role = None
        for key in _KEYS:
            for pat in getattr(self, key):
                if _is_glob(pat) and _match(pat, name):
                    rank = (_specificity(pat), -_TIE_ORDER[key])
                    if best is None or rank > best:
                        best, role = rank, _ROLE_OF_KEY[key]
        if role is not None:
            return role
        if not self.frozen:
            return "frozen"  # only trainable (and buffers) listed: the rest is frozen
        return "unknown"

    def with_buffers(self, patterns: Iterable[str]) -> Manifest:
        """This manifest plus buffer patterns, e.g. a checkpoint's auxiliary state (``optimizer.*``).

        The added globs take part in the usual specificity rule, so a
        pattern the user wrote that is at least as specific still wins.
        """
        extra = tuple(p for p in patterns if p not in self.buffers)
        if not extra:
            return self
        return Manifest(self.trainable, self.frozen, self.buffers + extra, source=self.source)

    def with_auxiliary(self, names: Iterable[str]) -> Manifest:
        """Buffers for top-level training state (``Checkpoint.auxiliary``): each name and everything under it."""
        return self.with_buffers([p for key in dict.fromkeys(names) for p in (key, f"{key}.*")])

    def to_dict(self) -> dict[str, list[str]]:
        out = {"trainable": list(self.trainable), "frozen": list(self.frozen)}
        if self.buffers:
            out["buffers"] = list(self.buffers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "") -> Manifest:
        if isinstance(data, list):  # a bare list of trainable keys
            data = {"trainable": data}
        if not isinstance(data, dict):
            raise CkptError("manifest must be a JSON object with 'trainable'/'frozen' lists", source or None)
        unknown = set(data) - set(_KEYS)
        if unknown:
            raise CkptError(f"manifest has unknown keys {sorted(unknown)}; expected {list(_KEYS)}", source or None)
        lists: dict[str, tuple[str, ...]] = {}
        for key in _KEYS:
            val = data.get(key, [])
            if not isinstance(val, list) or not all(isinstance(p, str) for p in val):
                raise CkptError(f"manifest '{key}' must be a list of strings", source or None)
            lists[key] = tuple(val)
        if not lists["trainable"] and not lists["frozen"]:
            raise CkptError("manifest lists no 'trainable' and no 'frozen' patterns", source or None)
        return cls(lists["trainable"], lists["frozen"], lists["buffers"], source=source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a manifest JSON file; CkptError with the path on any problem."""
        p = os.fspath(path)
        try:
            with open(p, "rb") as f:
                raw = f.read((16 << 20) + 1)
        except FileNotFoundError:
            raise CkptError("manifest file not found", p) from None
        except IsADirectoryError:
            raise CkptError("manifest is a directory, expected a JSON file", p) from None
        except OSError as e:
            raise CkptError(f"cannot read manifest: {e.strerror}", p) from None
        if len(raw) > 16 << 20:
            raise CkptError("manifest is larger than 16 MiB", p)
        try:
            data = json.loads(raw)
        except UnicodeDecodeError:
            raise CkptError("manifest is not valid JSON (not UTF-8 text: is it a checkpoint?)", p) from None
        except ValueError as e:  # JSONDecodeError, and ints too long to convert
            raise CkptError(f"manifest is not valid JSON ({str(e)[:200]})", p) from None
        except RecursionError:
            raise CkptError("manifest is not valid JSON (nested too deeply)", p) from None
        return cls.from_dict(data, source=p)

    @classmethod
    def from_keys(cls, trainable: Iterable[str], *, frozen: Sequence[str] = (), buffers: Sequence[str] = (),
                  source: str = "") -> Manifest:
        return cls(tuple(trainable), tuple(frozen), tuple(buffers), source=source)


@lru_cache(maxsize=4096)
def _compiled(pat: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pat))


def _match(pat: str, name: str) -> bool:
    return _compiled(pat).match(name) is not None
