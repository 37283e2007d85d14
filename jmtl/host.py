"""Host-side settings that make jitted steps faster on CPU.

Nothing here runs unless you call it: it changes process-wide behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory for reuse instead of unmapping it.

    XLA:CPU allocates one block for the temporaries of a compiled computation on every
    call. glibc serves a block larger than its mmap ceiling (32 MiB on 64-bit Linux) with
    a fresh ``mmap`` and unmaps it on ``free``, so every call page-faults the whole
    block in again. A params-mode step of ``benchmarks/speed.py`` at K = 32 has 36 MiB of
    temporaries: 8,700 minor page faults and 10-15 ms of a 55-60 ms step on one core.
    After this call the block comes from the heap and is reused (1 fault per step; the
    step took 40 ms). It does the same for every other library in the process (torch
    included).

    It calls ``mallopt(M_MMAP_MAX, 0)`` (no ``mmap`` for large blocks) and
    ``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)`` (do not return the heap's top to the
    system). The cost: memory freed by the process stays mapped, so its resident size
    stays at its peak. The environment variable
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295``,
    set before Python starts, has the same effect.

    Returns:
      ``True`` if glibc accepted both settings, ``False`` where there is no glibc
      (macOS, Windows, musl) and nothing was changed.

    Examples:
      >>> import jmtl.host
      >>> jmtl.host.keep_freed_memory() in (True, False)
      True

    References:
      glibc manual, "Malloc Tunable Parameters" (``mallopt``, ``M_MMAP_MAX``,
      ``M_TRIM_THRESHOLD``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
