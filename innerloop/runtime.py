"""Process settings that make meta-training on CPU faster: glibc's malloc thresholds.

A meta-iteration of conv-4 MAML allocates and frees the same large activation tensors again and
again (layer one of a 75-image query set is a 15 MB tensor; its BatchNorm, max-pool and their
backward passes each allocate one). glibc's malloc hands blocks above its mmap threshold back to the
operating system as soon as they are freed, and trims the top of its heap, so every new block is
faulted in page by page (the kernel zeroes each 4 KiB page). glibc's own thresholds adapt to the
allocation history, so how much a process loses varies. What it costs and saves is measured in
``benchmarks/results/speed.md`` (rows ``innerloop-nomalloc`` and ``learn2learn-malloc``).

:func:`tune_malloc` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the trim
threshold to 1 GiB, so freed blocks are reused by the next allocation instead. The cost: up to
1 GiB of freed memory stays with the process instead of going back to the system. It is
process-wide, like ``torch.set_num_threads``; the task-execution layer
(:mod:`innerloop.execution`) calls it once, when it first runs tasks as a loop on CPU.
``INNERLOOP_TUNE_MALLOC=0`` in the environment turns it off; glibc's own
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` variables, when set, win (innerloop then
leaves malloc alone). Other C libraries (musl, macOS, Windows): nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

MMAP_THRESHOLD = 32 * 2**20
"""Bytes: blocks at least this large are mmapped (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 2**30
"""Bytes of free memory at the top of the heap that glibc keeps instead of returning them."""

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_state: bool | None = None
_lock = threading.Lock()


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring) once per process.

    Returns whether the thresholds are innerloop's now: ``False`` when turned off by
    ``INNERLOOP_TUNE_MALLOC=0``, when the user set glibc's own variables, or when the C library is
    not glibc. Safe to call from any thread, any number of times.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> bool:
    if os.environ.get("INNERLOOP_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only; musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success (a Python int, via restype c_int)
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return False
    trim_ok: int = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return trim_ok == 1
