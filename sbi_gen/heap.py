"""Keep the memory a training step frees for the next step, instead of handing it back to the OS.

glibc's ``malloc`` serves every allocation above 32 MiB with a fresh ``mmap`` and unmaps it when
freed, and trims the heap when much of its top is free. A training step on maps allocates such
blocks for every activation (a batch of 512 maps of 32 × 32 through 64 channels is 128 MiB a
layer), so every step page-faults gigabytes back in and the kernel zeroes them: with the default
NSF and CNN embedding on the cosmology maps, one thread, a step took 13.4 s, 8.3 s of it in the
kernel (4 million page faults), and 5.4 s (0.3 s in the kernel) with :func:`heap_kept`; two
epochs of NPE on 3,000 such maps took 142 s without it (86 s in the kernel) and 61 s with it (8 s),
the same weights to the last bit.
Estimators on vectors allocate blocks of kilobytes and do not notice either way.

:func:`heap_kept` is used by :func:`sbi_gen.train.fit`: inside it, large blocks come from the
heap and the heap is never trimmed; on leaving, ``malloc`` gets the thresholds its own dynamic
rule reaches after large blocks were freed (blocks up to 32 MiB from the heap, larger ones
mapped, the heap trimmed above 64 MiB of free top) and the heap is trimmed. Elsewhere than
glibc (macOS, musl) it does nothing.

Example:
    >>> with heap_kept():
    ...     pass
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["heap_kept"]

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# What glibc's dynamic thresholds reach on a 64-bit system once large blocks have been freed,
# and its default cap on the number of mapped blocks.
_MMAP_THRESHOLD_MAX = 32 << 20
_MMAP_MAX_DEFAULT = 65536


@functools.cache
def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def heap_kept() -> Iterator[None]:
    """Inside, freed memory stays in the heap for reuse (see the module docstring)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)  # no block of its own: everything from the heap
    libc.mallopt(_M_TRIM_THRESHOLD, -1)  # never trimmed
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)
