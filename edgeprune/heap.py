"""Hand memory back to the OS between passes: freed heap blocks (glibc's ``malloc_trim``), large temporaries as
soon as they are freed (``bound_heap``) and the memory-mapped checkpoint pages of weights that surgery replaced
(``release_file_pages``).

It does not free any tensor itself, track allocations or limit memory; on a C library other than glibc, or
without ``/proc``, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


def trim_heap() -> None:
    """Hand the memory freed by a pass back to the OS (glibc's ``malloc_trim``; nothing elsewhere). glibc keeps
    freed heap blocks below its (adaptive, up to 32 MiB) mmap threshold, and a pass's temporaries are such
    blocks, so without this the process's resident size creeps up by what earlier passes left behind."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:  # glibc
        trim(0)


# measured on a 0.5B model's streamed scoring (peak above the imports, its first 4 layers; README "Scale"): glibc's
# dynamic threshold 436-444 MiB, fixed 8 MiB 413-416, 4 MiB 426-430, 2 MiB 384-411, 1 MiB 384-389, 512 KiB 381-389
HEAP_MMAP_THRESHOLD = 2**20
TRIM_FACTOR = 2  # the heap-top trim threshold, x the mmap threshold: glibc's own ratio of the two
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def bound_heap(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mapping, returned to the OS when freed.
    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed, so a pass's later tensors of
    a few MiB come from the heap, where freed blocks fragment it and the peak RSS grows by what the pass frees
    and reallocates (on a 0.5B model's streamed scoring ~50 MiB of a 440 MiB peak). A fixed threshold keeps the
    peak near what is live, for page faults on each large temporary (streamed scoring took ~25 % longer).
    Process-wide and idempotent; True where it took effect (glibc)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc
        return False
    # the trim threshold too: glibc doubled it with every raise of the mmap threshold (up to 64 MiB), and a freed
    # heap top below it is never given back
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_FACTOR * threshold) == 1


def storage_ranges(module) -> list[tuple[int, int]]:
    """(address, bytes) of the CPU storages behind a module's parameters and buffers."""
    out = []
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "cpu":
            s = t.untyped_storage()
            if s.nbytes():
                out.append((s.data_ptr(), s.nbytes()))
    return out


def release_file_pages(dead: list[tuple[int, int]], live: list[tuple[int, int]]) -> int:
    """Drop from this process the pages of storages that surgery has replaced, where they are pages of a
    memory-mapped safetensors file. transformers maps a checkpoint's tensors straight from the file (zero-copy);
    such a file stays mapped while any tensor of it lives (a layer's norms, the embeddings), so the pages of the
    cut weights stay resident, although nothing reads them again. ``dead``: the (address, bytes) of the storages
    before the cut (``storage_ranges``); ``live``: those of every storage still in use. Only whole pages inside a
    dead range, outside every live range and inside a ``*.safetensors`` file mapping (``/proc/self/maps``) are
    released (``madvise(MADV_DONTNEED)``: the data stays in the file and the page cache; a read would fault the
    file's bytes back in). Returns the bytes released; nothing on systems without ``/proc`` or ``madvise``."""
    maps = _file_maps()
    libc = _libc()
    if not maps or libc is None:
        return 0
    page = _page_size()
    live = sorted(live)
    released = 0
    for addr, size in dead:
        start, end = -(-addr // page) * page, (addr + size) // page * page
        for ms, me in maps:
            lo, hi = max(start, ms), min(end, me)
            for a, b in _minus(lo, hi, live, page):
                if libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), MADV_DONTNEED) == 0:
                    released += b - a
    return released


MADV_DONTNEED = 4  # Linux


def _minus(lo: int, hi: int, live: list[tuple[int, int]], page: int) -> list[tuple[int, int]]:
    """[lo, hi) without the pages that overlap any live range (page-aligned pieces)."""
    pieces, cur = [], lo
    for addr, size in live:
        a, b = addr // page * page, -(-(addr + size) // page) * page  # the live range's pages, rounded outward
        if b <= cur or a >= hi:
            continue
        if a > cur:
            pieces.append((cur, a))
        cur = max(cur, b)
    if cur < hi:
        pieces.append((cur, hi))
    return [(a, b) for a, b in pieces if b > a]


def _file_maps() -> list[tuple[int, int]]:
    try:
        lines = open("/proc/self/maps").read().splitlines()  # noqa: SIM115
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


@functools.cache
def _libc():
    """The C library (None where it cannot be loaded); its glibc-only functions are looked up by the callers."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True) if name else None
        if libc is not None:
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def _page_size() -> int:
    import mmap

    return mmap.PAGESIZE
