"""``python -m ckptdiff ...``: the same as the ``ckptdiff`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
