"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

glibc serves every allocation above its mmap threshold (128 KB to 32 MB) with a fresh `mmap` and
unmaps it on free, and trims the heap's top as soon as 128 KB are free there. A training step or a
backbone forward allocates and frees the same large tensors every time, so each one faults its pages
in anew: about 40,000 page faults per CATNet head step. Holding freed memory is what the tcmalloc /
jemalloc preloads of PyTorch's CPU performance guide buy; `mallopt` gets it without a preload. The
cost is a higher resident set (freed memory stays mapped), measured beside the speed-up in
docs/benchmarks.md section 4.

`catnet train`, `eval` and `predict` call `hold_freed_memory()` once per process (catnet.cli.HOLDS_MEMORY
says which verbs, and why not the others); library callers may call it themselves. It changes nothing
when `CATNET_MALLOC=system`, when the user tuned glibc through its own `MALLOC_*` variables, or when the
C library is not glibc (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import os
import platform

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_MMAP_THRESHOLD_START = 128 << 10  # glibc's starting (and smallest dynamic) mmap threshold
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int
_MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
_USER_KNOBS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
               "MALLOC_ARENA_MAX")

_held = False


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another one."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def hold_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it, for the rest of the process. True when
    this call or an earlier one changed the allocator, False when it was left alone (see the module)."""
    global _held
    if _held:
        return True
    if os.environ.get("CATNET_MALLOC", "hold") == "system" or any(k in os.environ for k in _USER_KNOBS):
        return False
    libc = glibc()
    if libc is None:
        return False
    # Both or neither: without mmap every large block comes from the heap, and a heap that is trimmed
    # at 128 KB of free top would fault the same pages in again.
    if libc.mallopt(M_MMAP_MAX, 0) != 1:
        return False
    if libc.mallopt(M_TRIM_THRESHOLD, _TRIM_NEVER) != 1:
        libc.mallopt(M_MMAP_MAX, _MMAP_MAX_DEFAULT)
        return False
    _held = True
    return True


def fix_mmap_threshold() -> None:
    """Keep large blocks out of glibc's heap, so peak memory does not grow with a video's length.

    The opposite trade to `hold_freed_memory`, for `catnet extract`. glibc raises its mmap threshold (up
    to 32 MB) whenever a large block is freed, so from then on every window's frames and views and every
    batch's activations (freed a moment later) come from the heap, where the small long-lived rows of the
    video in progress pin them: the heap fragments and RSS creeps up with the length of a dense video
    (docs/benchmarks.md, "Dense extraction"). Fixing the threshold at glibc's starting value gives each
    such block its own mapping, returned to the system when freed, at the cost of a few page faults per
    batch. Process-wide (forked decoding workers inherit it); a no-op without glibc.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_START)
