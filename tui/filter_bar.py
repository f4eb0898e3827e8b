"""The filter line that ``/`` opens above the tensor table.

It filters as you type. One box takes everything: a name pattern (``attn``
matches anywhere, ``*.weight`` is a glob on the whole name, ``re:^enc\\.\\d``
or ``/.../`` a regex) plus ``role:frozen``, ``status:changed`` and
``is:drift`` / ``is:stale`` tokens, so filtering never needs the mouse.
"""

from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual.widgets import Input

PLACEHOLDER = "name (attn, *.weight, re:^enc) + role:frozen status:changed is:drift · Enter keeps, Esc clears"


class FilterBar(Input):
    BINDINGS = [Binding("escape", "dismiss", "Clear filter")]

    class Dismissed(Message):
        """Esc: clear the filter and give the keyboard back to the table."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(placeholder=PLACEHOLDER, **kwargs)  # type: ignore[arg-type]

    def action_dismiss(self) -> None:
        self.value = ""
        self.post_message(self.Dismissed())
