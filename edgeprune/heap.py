"""Hand freed heap memory back to the OS between passes (glibc's ``malloc_trim``).

It does not free anything itself, track allocations or limit memory; on a C library other than glibc it does
nothing.
"""

from __future__ import annotations

import functools


def trim_heap() -> None:
    """Hand the memory freed by a pass back to the OS (glibc's ``malloc_trim``; nothing elsewhere). glibc keeps
    freed heap blocks below its (adaptive, up to 32 MiB) mmap threshold, and a pass's temporaries are such
    blocks, so without this the process's resident size creeps up by what earlier passes left behind."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
