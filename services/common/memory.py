"""Process memory: give large freed buffers back to the operating system.

glibc serves allocations above its mmap threshold (128 KiB at start) with mmap and
returns them on free, but the first such free *raises* the threshold to that size (up to
32 MiB). From then on Pillow's 16 MiB image blocks come from per-thread heaps and stay
resident after the image is gone: measured here, 16 near-limit PNGs decoded one at a
time on 6 threads left 614 MiB resident (peak 872); with a fixed threshold, 54 MiB (peak
139). Fixing the threshold switches the dynamic adjustment off.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold; False where the C library is not glibc (no-op)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
