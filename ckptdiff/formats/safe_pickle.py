"""A pickle interpreter with torch's weights-only rules and hard resource bounds.

Why not ``pickle.Unpickler`` with a restrictive ``find_class``: the C
unpickler trusts the stream's numbers and shapes. ``LONG_BINPUT 2**27`` makes
it grow its memo array to that index (gigabytes from a 200-byte file), a
dict key that is a tuple nested two million deep overflows the C stack when
it is hashed (a segfault, not an exception), and BUILD sets attributes on
whatever object sits on the stack. Those are properties of the machine, not
of the allow-list, so the allow-list cannot fix them.

This module interprets the stream itself, in Python, and accepts exactly the
opcodes that ``torch.load(weights_only=True)`` accepts (torch's
``_weights_only_unpickler``: protocol 2 as ``torch.save`` writes it), with
the same meaning for each. On top of torch's rules it enforces:

* the memo is a dict (never an allocation sized by an index) and a memo
  index may not exceed the number of instructions read so far;
* nesting depth: every container records how deep it is; building one
  deeper than :data:`MAX_DEPTH` is refused before anything hashes it;
* integer size: ``LONG1`` is at most 255 bytes by construction; the
  protocol's unbounded forms (``LONG4``, text ``LONG``) are not accepted;
* instructions: at most :data:`MAX_OPS` per stream.

With ``protocol4=True`` it also accepts what ``pickle.dumps`` writes by
default (protocols 3-5), under the same bounds, for pickles torch itself
never loads weights-only (a torch.distributed.checkpoint ``.metadata``).

Globals are resolved by the caller's ``find_class``; objects it does not
know become :class:`Opaque` placeholders (``find_class`` may also return one
deliberately) so that the rest of the stream is still validated, and the
caller learns from :attr:`SafeUnpickler.opaque` that torch must decide.
Every refusal raises :class:`PickleRefused` with a one-line reason.
"""

from __future__ import annotations

import struct
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import CkptError

#: Containers nested deeper than this are refused (a real checkpoint is < 20 deep).
MAX_DEPTH = 500
#: Refuse streams with more opcodes than this (a state_dict of 100k tensors needs ~3M).
MAX_OPS = 50_000_000

_UNPACK_I = struct.Struct("<i").unpack_from
_UNPACK_UI = struct.Struct("<I").unpack_from
_UNPACK_H = struct.Struct("<H").unpack_from
_UNPACK_D = struct.Struct(">d").unpack_from


class PickleRefused(Exception):
    """The stream breaks a rule; the message is one line for the user."""


class NeedsTorch(Exception):
    """Raised by a ``find_class`` result or ``persistent_load`` that cannot build this object:
    interpretation continues with an :class:`Opaque` in its place, and torch decides."""


class Opaque:
    """Stands for something only torch can build (an unknown global, or what it returns).

    Calling it, building it or using it as a persistent id yields another
    placeholder, so interpretation continues and the whole stream is checked.
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __reduce__(self) -> Any:  # never pickled back; keeps copy/pickle from walking it
        raise TypeError("Opaque placeholders are not picklable")


def _compat_names() -> tuple[dict[tuple[str, str], tuple[str, str]], dict[str, str]]:
    """Python 2 module/name spellings, mapped as torch's unpickler maps them."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    return NAME_MAPPING, IMPORT_MAPPING


class SafeUnpickler:
    """One load of one pickle stream (fresh state: nothing is shared between loads).

    Args:
        data: the bytes holding the pickle.
        find_class: ``(module, name) -> object``; return :class:`Opaque` (or
            raise :class:`PickleRefused`) for anything outside the allow-list.
        persistent_load: ``pid -> object`` for BINPERSID, after torch's own
            check (a tuple whose first item is ``'storage'``, or an int).
        start: offset of the stream in ``data`` (several pickles in one file).
        protocol4: also accept what ``pickle.dumps`` writes by default (protocols 3-5:
            FRAME, short and 8-byte strings and bytes, MEMOIZE, STACK_GLOBAL, sets,
            POP/DUP, NEWOBJ(_EX)), with the same bounds. Not torch's rules: for
            pickles torch does not load with ``weights_only`` (a DCP ``.metadata``).
            NEWOBJ calls the stand-in ``find_class`` returned with the arguments, and
            BUILD calls the built object's own ``__setstate__`` if its class has one.
    """

    def __init__(self, data: bytes | memoryview, find_class: Callable[[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None = None, start: int = 0,
                 protocol4: bool = False) -> None:
        self.protocol4 = protocol4
        self.data = data
        self.pos = start
        self.find_class = find_class
        self.persistent_load = persistent_load
        self.opaque: list[str] = []

    # -- reading --------------------------------------------------------------------------------
    def _line(self) -> bytes:
        data = self.data
        nl = bytes(data[self.pos:self.pos + 4096]).find(b"\n")
        if nl < 0:
            raise PickleRefused("pickle has an unterminated or over-long GLOBAL name")
        line = bytes(data[self.pos:self.pos + nl])
        self.pos += nl + 1
        return line

    # -- the machine ----------------------------------------------------------------------------
    def load(self) -> Any:
        """Interpret up to STOP; returns the top object (torch's result)."""
        try:
            return self._run()
        except (IndexError, struct.error):  # reading past the end, or popping an empty stack
            raise PickleRefused("pickle is truncated or pops more than it pushed") from None

    def _run(self) -> Any:  # noqa: C901 - one flat dispatch loop is the fast way to interpret in Python
        # Locals, not attributes, and the frequent opcodes first: a 20,000-tensor state_dict is ~10^6 ops.
        stack: list[Any] = []
        depth: list[int] = []  # nesting depth of each stack item (0 for scalars)
        metastack: list[tuple[list[Any], list[int]]] = []
        memo: dict[int, tuple[Any, int]] = {}
        names, modules = _compat_names()
        data = self.data
        size = len(data)
        pos = self.pos
        n_ops = 0
        limit = MAX_DEPTH

        def too_deep() -> PickleRefused:
            return PickleRefused(f"pickle nests containers more than {MAX_DEPTH} deep")

        def text(n: int, at: int) -> bytes:
            if at + n > size:
                raise IndexError
            return bytes(data[at:at + n])

        while True:
            n_ops += 1
            if n_ops > MAX_OPS:
                raise PickleRefused(f"pickle has more than {MAX_OPS} instructions")
            op = data[pos]
            pos += 1
            if op == 0x71:  # BINPUT
                idx = data[pos]
                pos += 1
                if idx >= n_ops:  # a pickler numbers memo entries 0, 1, 2, ...: never beyond the objects made
                    raise PickleRefused(f"pickle stores memo entry {idx} after only {n_ops} instructions")
                memo[idx] = (stack[-1], depth[-1])
            elif op == 0x58:  # BINUNICODE
                n = _UNPACK_UI(data, pos)[0]
                stack.append(str(text(n, pos + 4), "utf-8", "surrogatepass"))
                depth.append(0)
                pos += 4 + n
            elif op == 0x4B:  # BININT1
                stack.append(data[pos])
                depth.append(0)
                pos += 1
            elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                if op == 0x68:
                    idx = data[pos]
                    pos += 1
                else:
                    idx = _UNPACK_UI(data, pos)[0]
                    pos += 4
                hit = memo.get(idx)
                if hit is None:
                    raise PickleRefused(f"pickle reads memo entry {idx}, which was never stored")
                stack.append(hit[0])
                depth.append(hit[1])
            elif op == 0x28:  # MARK
                if len(metastack) >= limit:  # open marks nest the containers they will close into
                    raise too_deep()
                metastack.append((stack, depth))
                stack, depth = [], []
            elif op == 0x74:  # TUPLE
                if not metastack:
                    raise PickleRefused("pickle closes a MARK it never opened")
                d = max(depth, default=0) + 1
                items = tuple(stack)
                stack, depth = metastack.pop()
                if d > limit:
                    raise too_deep()
                stack.append(items)
                depth.append(d)
            elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1..3
                n = op - 0x84
                if len(stack) < n:
                    raise PickleRefused("pickle builds a tuple from too few items")
                items = tuple(stack[-n:])
                d = max(depth[-n:]) + 1
                if d > limit:
                    raise too_deep()
                del stack[-n:], depth[-n:]
                stack.append(items)
                depth.append(d)
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                d = depth.pop()
                func = stack[-1]
                if isinstance(func, Opaque):  # (stand-ins refuse placeholder arguments themselves)
                    result: Any = Opaque("the result of a global only torch can call")
                elif not callable(func):
                    raise PickleRefused(f"pickle calls a {type(func).__name__}")
                elif type(args) is not tuple:
                    raise PickleRefused("pickle calls a function with arguments that are not a tuple")
                else:
                    result = self._call(func, args)
                stack[-1] = result
                depth[-1] = d + 1 if isinstance(result, (tuple, list, dict, OrderedDict, Opaque)) else 1
            elif op == 0x51:  # BINPERSID
                pid = stack.pop()
                d = depth.pop()
                if type(pid) is not tuple and type(pid) is not int:
                    raise PickleRefused(f"pickle's persistent id is a {type(pid).__name__}")
                if type(pid) is tuple and pid and _ascii(pid[0]) != "storage":
                    raise PickleRefused("pickle's persistent id does not name a storage")
                if self.persistent_load is None:
                    stack.append(Opaque("a persistent object"))
                else:
                    stack.append(self._call(self.persistent_load, (pid,)))
                depth.append(d + 1)
            elif op == 0x63:  # GLOBAL
                self.pos = pos
                module = self._line().decode("utf-8", "strict")
                name = self._line().decode("utf-8", "strict")
                pos = self.pos
                if (module, name) in names:
                    module, name = names[(module, name)]
                elif module in modules:
                    module = modules[module]
                found = self._call(self.find_class, (module, name))
                if isinstance(found, Opaque) and found.what not in self.opaque:
                    self.opaque.append(found.what)
                stack.append(found)
                depth.append(0)
            elif op == 0x73 or op == 0x75:  # SETITEM, SETITEMS
                if op == 0x73:
                    value, key = stack.pop(), stack.pop()
                    d = max(depth.pop(), depth.pop())
                    items = [key, value]
                else:
                    if not metastack:
                        raise PickleRefused("pickle closes a MARK it never opened")
                    items, d = stack, max(depth, default=0)
                    stack, depth = metastack.pop()
                    if len(items) % 2:
                        raise PickleRefused("pickle's SETITEMS has a key without a value")
                self._setitems(items, d, stack, depth)
            elif op == 0x61 or op == 0x65:  # APPEND, APPENDS
                if op == 0x61:
                    items = [stack.pop()]
                    d = depth.pop()
                else:
                    if not metastack:
                        raise PickleRefused("pickle closes a MARK it never opened")
                    items, d = stack, max(depth, default=0)
                    stack, depth = metastack.pop()
                target = stack[-1]
                if not isinstance(target, Opaque) and type(target) is not list:
                    raise PickleRefused(f"pickle appends to a {type(target).__name__}, not a list")
                _deepen(depth, d)
                if not isinstance(target, Opaque):
                    target.extend(items)
            elif op == 0x4E:  # NONE
                stack.append(None)
                depth.append(0)
            elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
                stack.append(op == 0x88)
                depth.append(0)
            elif op == 0x29:  # EMPTY_TUPLE
                stack.append(())
                depth.append(0)
            elif op == 0x5D:  # EMPTY_LIST
                stack.append([])
                depth.append(1)
            elif op == 0x7D:  # EMPTY_DICT
                stack.append({})
                depth.append(1)
            elif op == 0x8F:  # EMPTY_SET
                stack.append(set())
                depth.append(1)
            elif op == 0x72:  # LONG_BINPUT
                idx = _UNPACK_UI(data, pos)[0]
                pos += 4
                if idx >= n_ops:
                    raise PickleRefused(f"pickle stores memo entry {idx} after only {n_ops} instructions")
                memo[idx] = (stack[-1], depth[-1])
            elif op == 0x4A:  # BININT
                stack.append(_UNPACK_I(data, pos)[0])
                depth.append(0)
                pos += 4
            elif op == 0x4D:  # BININT2
                stack.append(_UNPACK_H(data, pos)[0])
                depth.append(0)
                pos += 2
            elif op == 0x8A:  # LONG1: at most 255 bytes, so at most ~615 decimal digits
                n = data[pos]
                stack.append(int.from_bytes(text(n, pos + 1), "little", signed=True))
                depth.append(0)
                pos += 1 + n
            elif op == 0x47:  # BINFLOAT
                stack.append(_UNPACK_D(data, pos)[0])
                depth.append(0)
                pos += 8
            elif op == 0x55:  # SHORT_BINSTRING (torch.load decodes it as utf-8)
                n = data[pos]
                try:
                    stack.append(text(n, pos + 1).decode("utf-8"))
                except UnicodeDecodeError:
                    raise PickleRefused("pickle holds a byte string that is not UTF-8") from None
                depth.append(0)
                pos += 1 + n
            elif op == 0x62:  # BUILD
                state = stack.pop()
                d = depth.pop()
                inst = stack[-1]
                if isinstance(inst, Opaque):
                    pass
                elif type(inst) is OrderedDict and type(state) is dict:
                    _deepen(depth, d)
                    inst.__dict__.update(state)  # torch sets the attributes (e.g. _metadata) the same way
                elif self.protocol4 and getattr(type(inst), "__setstate__", None) is not None:
                    _deepen(depth, d)
                    stack[-1] = self._call(inst.__setstate__, (state,)) or inst
                else:
                    # Tensors and parameters carry state torch applies with its own checks: let torch decide.
                    stack[-1] = Opaque(f"BUILD on a {type(inst).__name__}")
                    self.opaque.append(stack[-1].what)
            elif op == 0x81 or (op == 0x92 and self.protocol4):  # NEWOBJ, NEWOBJ_EX
                kwargs = stack.pop() if op == 0x92 else {}
                d = depth.pop() if op == 0x92 else 0
                args = stack.pop()
                d = max(d, depth.pop())
                cls = stack[-1]
                if self.protocol4 and not isinstance(cls, Opaque) and callable(cls) \
                        and type(args) is tuple and type(kwargs) is dict:
                    stack[-1] = self._call(lambda: cls(*args, **kwargs), ())
                else:  # torch builds Parameters and allow-listed classes: leave it to torch
                    stack[-1] = Opaque("NEWOBJ")
                    self.opaque.append("NEWOBJ")
                depth[-1] = d + 1
            elif self.protocol4 and op in _PROTOCOL4:
                pos = self._protocol4(op, pos, stack, depth, metastack, memo)
            elif op == 0x80:  # PROTO
                pos += 1
            elif op == 0x2E:  # STOP
                self.pos = pos
                return stack.pop()
            else:
                raise PickleRefused(f"the pickle uses opcode {op} ({_opname(op)}), which weights-only loading "
                                    "does not accept (not a PyTorch checkpoint?); ckptdiff never runs code from "
                                    "a checkpoint")

    def _protocol4(self, op: int, pos: int, stack: list[Any], depth: list[int],
                   metastack: list[tuple[list[Any], list[int]]], memo: dict[int, tuple[Any, int]]) -> int:
        """The opcodes of protocols 3-5 that torch's weights-only loader does not accept; returns the new offset."""
        data = self.data
        if op == 0x95:  # FRAME: a length hint only
            return pos + 8
        if op in (0x8C, 0x43):  # SHORT_BINUNICODE, SHORT_BINBYTES
            n, pos = data[pos], pos + 1
        elif op in (0x8D, 0x8E):  # BINUNICODE8, BINBYTES8
            n, pos = struct.unpack_from("<Q", data, pos)[0], pos + 8
        elif op == 0x42:  # BINBYTES
            n, pos = _UNPACK_UI(data, pos)[0], pos + 4
        else:
            n = -1
        if n >= 0:
            if pos + n > len(data):
                raise IndexError
            raw = bytes(data[pos:pos + n])
            stack.append(str(raw, "utf-8", "surrogatepass") if op in (0x8C, 0x8D) else raw)
            depth.append(0)
            return pos + n
        if op == 0x94:  # MEMOIZE
            memo[len(memo)] = (stack[-1], depth[-1])
        elif op == 0x93:  # STACK_GLOBAL
            name, module = stack.pop(), stack.pop()
            del depth[-2:]
            if type(module) is not str or type(name) is not str:
                raise PickleRefused("pickle's STACK_GLOBAL names are not strings")
            found = self._call(self.find_class, (module, name))
            if isinstance(found, Opaque) and found.what not in self.opaque:
                self.opaque.append(found.what)
            stack.append(found)
            depth.append(0)
        elif op == 0x30:  # POP
            stack.pop()
            depth.pop()
        elif op == 0x32:  # DUP
            stack.append(stack[-1])
            depth.append(depth[-1])
        elif op == 0x31:  # POP_MARK
            stack[:], depth[:] = metastack.pop()
        elif op == 0x91:  # FROZENSET
            items, d = stack[:], max(depth, default=0)
            stack[:], depth[:] = metastack.pop()
            if d + 1 > MAX_DEPTH:
                raise PickleRefused(f"pickle nests containers more than {MAX_DEPTH} deep")
            stack.append(frozenset(_hashable(items)))
            depth.append(d + 1)
        elif op == 0x90:  # ADDITEMS
            items, d = stack[:], max(depth, default=0)
            stack[:], depth[:] = metastack.pop()
            if type(stack[-1]) is not set:
                raise PickleRefused(f"pickle adds items to a {type(stack[-1]).__name__}, not a set")
            _deepen(depth, d)
            stack[-1].update(_hashable(items))
        return pos

    def _call(self, func: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Call a stand-in; anything it cannot build (or chokes on) becomes an Opaque for torch to judge."""
        try:
            return func(*args)
        except (PickleRefused, CkptError):  # a stand-in's own one-line refusal
            raise
        except NeedsTorch as e:
            why = str(e)
        except Exception as e:  # wrong arity, odd types: torch's own functions decide what that means
            why = f"{type(e).__name__}: {e}"
        found = Opaque(why)
        self.opaque.append(why)
        return found

    def _setitems(self, items: list[Any], d: int, stack: list[Any], depth: list[int]) -> None:
        target = stack[-1]
        if isinstance(target, Opaque):  # torch builds it; only the depth is ours to bound
            _deepen(depth, d)
            return
        if type(target) not in (dict, OrderedDict, Counter):
            raise PickleRefused(f"pickle sets an item on a {type(target).__name__}, not a dict")
        _deepen(depth, d)  # before hashing: the key's depth is bounded, so hashing it cannot overflow the C stack
        try:
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        except TypeError as e:  # an unhashable key: torch fails the same way
            raise PickleRefused(f"pickle uses an unusable dict key ({e})") from None

    @property
    def end(self) -> int:
        """Offset just past the STOP that ended :meth:`load`."""
        return self.pos


def _deepen(depth: list[int], d: int) -> None:
    """The container on top of the stack now holds something ``d`` deep."""
    if d + 1 > depth[-1]:
        if d + 1 > MAX_DEPTH:
            raise PickleRefused(f"pickle nests containers more than {MAX_DEPTH} deep")
        depth[-1] = d + 1


#: Opcodes accepted only with ``protocol4=True``.
_PROTOCOL4 = frozenset((0x95, 0x8C, 0x43, 0x8D, 0x8E, 0x42, 0x94, 0x93, 0x30, 0x32, 0x31, 0x91, 0x90))


def _hashable(items: list[Any]) -> list[Any]:
    for item in items:
        try:
            hash(item)  # depth is bounded, so hashing cannot overflow the C stack
        except TypeError as e:
            raise PickleRefused(f"pickle puts an unhashable item in a set ({e})") from None
    return items


def _ascii(x: Any) -> Any:
    return x.decode("ascii") if isinstance(x, bytes) else x


def _opname(op: int) -> str:
    import pickletools

    for desc in pickletools.opcodes:
        if desc.code == chr(op):
            return desc.name
    return "unknown"


def safe_unpickle(data: bytes | memoryview, find_class: Callable[[str, str], Any],
                  persistent_load: Callable[[Any], Any] | None = None,
                  start: int = 0, protocol4: bool = False) -> tuple[Any, list[str], int]:
    """Interpret one pickle with torch's weights-only rules and ckptdiff's bounds.

    Args:
        data: the bytes (a whole file is fine; see ``start``).
        find_class: resolves ``GLOBAL module name``; return an :class:`Opaque`
            for what only torch can build, raise :class:`PickleRefused` to refuse.
        persistent_load: builds BINPERSID objects (None: placeholders).
        start: where the pickle starts in ``data``.
        protocol4: also accept protocols 3-5 (see :class:`SafeUnpickler`), for
            pickles torch does not read with ``weights_only``.

    Returns:
        ``(object, opaque, end)``: the result, what only torch could build
        (empty when the result is complete), and the offset after STOP.

    Raises:
        PickleRefused: the stream is malformed or breaks a bound.
    """
    machine = SafeUnpickler(data, find_class, persistent_load, start, protocol4)
    try:
        obj = machine.load()
    except UnicodeDecodeError:
        raise PickleRefused("pickle holds text that is not valid UTF-8") from None
    except RecursionError:  # cannot happen with bounded depth; kept as a last line
        raise PickleRefused("pickle nested too deeply") from None
    except MemoryError:
        raise PickleRefused("pickle needs more memory than is available") from None
    return obj, machine.opaque, machine.end


def scan_only(module: str, name: str) -> Opaque:
    """A ``find_class`` that resolves nothing: validate a stream torch will load."""
    return Opaque(f"{module}.{name}")


__all__ = ["MAX_DEPTH", "NeedsTorch", "Opaque", "PickleRefused", "SafeUnpickler", "safe_unpickle", "scan_only"]
