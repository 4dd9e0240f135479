"""Give freed heap memory back to the system once the server is idle.

glibc's malloc keeps the pages of freed chunks (a long prompt's log-probs, a 4 MB response body) in
its arenas for reuse, so the resident set of a server that answered one big request stays that much
higher forever. `malloc_trim(0)` returns the free pages at the top of every arena and the whole free
pages inside them. It walks the heap, so the scheduler calls it once per idle period, not per step.
Other C libraries (musl, macOS) have no such call; there it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc

TRIM_AFTER_IDLE_S = 1.0  # an idle server trims this long after its last request finished


@functools.cache
def _malloc_trim():
    if ctypes.util.find_library("c") is None:
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Collect cyclic garbage, then hand free heap pages back to the system. True where the C library
    could (glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
