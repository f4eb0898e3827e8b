"""Make untrusted strings safe to print on one line.

Tensor names, tags, messages and paths come from files we do not trust. A
name holding ``\\n`` would split a table row or an error line in two, ``\\r``
would overwrite what was printed before it, an ESC sequence could recolour
or clear the user's terminal, and a bidi override (U+202E) could make
``evil.weight`` read as something else. Everything a person reads goes
through :func:`printable` first; JSON output does not need it (the encoder
escapes control characters itself).
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character (controls, format and separator
    characters other than the ASCII space) written as a visible escape such as ``\\n``,
    ``\\x1b`` or ``\\u202e``; printable text (any script, emoji) is returned unchanged."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


#: A run of characters without spaces longer than this is quoted by its ends only.
MAX_QUOTED = 200
#: A whole message longer than this keeps its beginning and end.
MAX_LINE = 1000


def _clip(text: str, limit: int) -> str:
    keep = limit // 2
    return f"{text[:keep]}...[{len(text) - 2 * keep} characters]...{text[-keep:]}"


def one_line(message: str) -> str:
    """An error message as one visible line of bounded length.

    Messages quote user-supplied strings (paths, refs, tensor names, header
    values) that can be 100,000 characters long: every run without spaces
    longer than :data:`MAX_QUOTED` keeps only its two ends, and the whole
    line at most :data:`MAX_LINE` characters. Applied once, where errors are
    printed, so no message has to remember it.
    """
    words = printable(message).split(" ")
    text = " ".join(_clip(w, MAX_QUOTED) if len(w) > MAX_QUOTED else w for w in words)
    return _clip(text, MAX_LINE) if len(text) > MAX_LINE else text


__all__ = ["MAX_LINE", "MAX_QUOTED", "one_line", "printable"]
