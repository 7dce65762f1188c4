"""glibc malloc settings for a process that trains: keep the memory a micro-batch frees for the next
one instead of handing it back to the kernel.

By default glibc returns freed memory at the top of the heap once it exceeds the trim threshold,
and serves large blocks with fresh mmaps. A training step frees and reallocates gigabytes of
activations, so every micro-batch would fault its pages in again. With trimming off and blocks up
to 32 MiB served from the heap, later passes reuse the pages, with the same peak resident memory
(measured in docs/speed.md). The cost: a process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
LARGEST_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
NO_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


@functools.cache
def keep_freed_memory() -> bool:
    """Turn off heap trimming and raise the mmap threshold to its largest, once per process; True
    where it took effect (Linux with glibc), False elsewhere (other allocators keep their defaults)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no glibc (musl has no mallopt): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, NO_TRIM) == 1
