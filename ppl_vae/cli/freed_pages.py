"""The command's process keeps the memory it frees, rather than faulting it in afresh.

glibc hands a freed block larger than its mmap threshold back to the system, and trims
the top of its heap once more than twice that threshold lies free there (the threshold
starts at 128 KB and grows, up to 32 MB, with the largest mapped block freed so far). The
next temporary of that size is then faulted in again page by page, at about 2 us a 4 KB
page on the machines measured. A step of ``fit_local`` on the digits (300 rows, 8
particles, 8-200-200-64) frees several 1.9 MB temporaries at once and so faulted about
1900 pages, 4 ms of an 18 ms step.

The ``ppl-vae`` command owns its process, so it raises both thresholds there. The
library itself never does: that would change how the user's whole process handles its
memory. In a notebook, call :func:`keep_freed_pages` once, or start Python with
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set to the same values.
"""

from __future__ import annotations

import ctypes

# Blocks up to this size come from the heap: glibc's own largest dynamic threshold, and
# the largest value its mallopt accepts.
MMAP_THRESHOLD = 32 * 2**20
# Memory left free at the top of the heap up to this much stays in the process: the
# freed temporaries of a few steps, not a model's worth of memory.
TRIM_THRESHOLD = 128 * 2**20
# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_pages() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module doc).

    Returns
    -------
    bool
        True where glibc took both settings; False where the C library has no
        ``mallopt`` (macOS, Windows: nothing changed) or refused one of them.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library of that kind here
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
