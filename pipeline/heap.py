"""Keep the C heap from ratcheting up over a long loop of large tensors.

glibc raises its mmap threshold each time a large mmapped block is freed; from then on blocks of
that size (image crops, activations) come from the heap, whose freed holes are seldom given back.
On the embed stage the process grew by ~100 MiB over 1,000 images that way and kept growing with
the folder. A fixed threshold (what `MALLOC_MMAP_THRESHOLD_` sets) keeps large blocks mmapped and
returned on free; the embed stage's RSS then stays flat (benchmarks/scaling.py).
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now kept


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold for this process (and the workers it forks); False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    return mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) == 1
