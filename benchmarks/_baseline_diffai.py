"""diffai (``pip install diffai-python``) on the same pair, in its own process.

usage: python _baseline_diffai.py OLD NEW
"""

from __future__ import annotations

import sys


def main(old: str, new: str) -> int:
    import diffai

    results = diffai.diff_paths(old, new)
    print(f"{len(results)} differences reported")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
