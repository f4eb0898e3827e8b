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


__all__ = ["printable"]
