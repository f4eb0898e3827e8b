"""Build hook for the five optional C modules; everything else is in pyproject.toml.

``ckptdiff._cstats`` measures changed tensors without importing numpy (see
ckptdiff/_cstats.c); ``ckptdiff._ckernel`` compares and hashes runs of small
tensors in one call (see ckptdiff/_ckernel.c); ``ckptdiff._cheader`` reads
the common safetensors header in one pass; ``ckptdiff._watchdog`` ends the
CLI with one line and exit 2 when the HDF5 library hangs on a corrupted
file; ``ckptdiff._crows`` writes the tensor rows of ``--format json``. All
are optional: without a C compiler the install still succeeds, ckptdiff
computes the same statistics with numpy and the same hashes in Python (more
slowly), parses safetensors headers in Python, reads HDF5 without the
deadline and writes the same JSON rows in Python.
"""

import os

from setuptools import Extension, setup

# -O3 for the measuring loops; -fno-math-errno/-fno-trapping-math let them
# vectorize without changing any result (no -ffast-math: NaN checks matter).
# -ffp-contract=off (already the default under -std=c99, said out loud): no
# fused multiply-adds, so _cstats' cause rules give Python's float64 results
# bit for bit whatever -march a build adds.
_FLAGS = [] if os.name == "nt" else ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-std=c99"]

setup(
    ext_modules=[
        Extension("ckptdiff._cstats", ["ckptdiff/_cstats.c"], extra_compile_args=_FLAGS, optional=True),
        Extension("ckptdiff._ckernel", ["ckptdiff/_ckernel.c"], extra_compile_args=_FLAGS, optional=True),
        # The common safetensors header read straight into columns (see ckptdiff/formats/safetensors_format.py).
        Extension("ckptdiff._cheader", ["ckptdiff/_cheader.c"], extra_compile_args=_FLAGS, optional=True),
        # The JSON rows of a report, the bytes render._rows writes (see ckptdiff/render.py).
        Extension("ckptdiff._crows", ["ckptdiff/_crows.c"], extra_compile_args=_FLAGS, optional=True),
        # A C-level deadline for HDF5 calls that never return (see ckptdiff/watchdog.py).
        Extension("ckptdiff._watchdog", ["ckptdiff/_watchdog.c"], optional=True),
    ],
)
