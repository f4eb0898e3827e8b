"""Build hook for the one optional C module; everything else is in pyproject.toml.

``ckptdiff._cstats`` measures changed tensors without importing numpy (see
ckptdiff/_cstats.c). It is optional: without a C compiler the install still
succeeds and ckptdiff computes the same statistics with numpy, more slowly.
"""

import os

from setuptools import Extension, setup

# -O3 for the measuring loops; -fno-math-errno/-fno-trapping-math let them
# vectorize without changing any result (no -ffast-math: NaN checks matter).
_FLAGS = [] if os.name == "nt" else ["-O3", "-fno-math-errno", "-fno-trapping-math", "-std=c99"]

setup(
    ext_modules=[
        Extension("ckptdiff._cstats", ["ckptdiff/_cstats.c"], extra_compile_args=_FLAGS, optional=True),
    ],
)
