"""``python -m ckptdiff ...``: the same as the ``ckptdiff`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
