"""Give freed heap memory back to the operating system.

glibc keeps freed blocks in its arenas, so a process that just replaced 16-bit weights by 4-bit
ones (QLoRA) would keep the old peak as its resident size; `malloc_trim` returns the free pages.
A no-op where glibc is absent."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> None:
    gc.collect()
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
