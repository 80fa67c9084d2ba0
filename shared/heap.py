"""Heap memory a serving process hands back to the system.

glibc's malloc keeps memory that a process frees: the top of its heap up to a trim threshold,
and that threshold rises with the largest block the process has freed (up to 64 MiB on 64-bit
Linux). A forward pass over a batch allocates and frees blocks of several MiB (no ONNX Runtime
memory arena, ``shared.families.transformers_onnx``), so after one large batch a pool process
may keep tens of MiB of free heap resident for as long as it lives.

``give_back_memory()`` collects and trims: after an unload and once a process has warmed up.
``task()`` marks a task running in this process. ``trim_if_idle()``, called by the heartbeat
(``TRIM_IDLE_MEMORY``), trims when no task is running, none ended in the last 0.25 s, and one
ended since the last trim: a process under load is not trimmed (its next batch would fault the
same pages back in); a process that has gone quiet is, once. A trim holds the malloc lock
while it walks the free blocks: a task that starts meanwhile waits for it. ``stats()``: the
idle trims so far and the resident memory they handed back (``stats["heap"]`` of a process's
snapshot).
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_S = 0.25  # no task ended for this long: the process has gone quiet
_lock = threading.Lock()
_running = 0  # tasks running in this process now
_ended = 0  # tasks ended in this process
_last_end = 0.0  # time.monotonic() when the last one ended
_trimmed_at = 0  # _ended at the last trim
_idle_trims = 0
_handed_back_mib = 0.0  # resident memory the idle trims handed back, in all


def resident_bytes() -> int:
    """This process's resident memory (RSS), 0 where it cannot be read."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable
        return 0


def trim_heap() -> float | None:
    """``malloc_trim(0)``: free heap pages back to the system; returns the MiB of resident memory
    that went (None where libc is not glibc)."""
    global _trimmed_at
    with _lock:
        _trimmed_at = _ended
    before = resident_bytes()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    return max(0.0, (before - resident_bytes()) / 2**20)


def give_back_memory() -> None:
    """After an unload, and once a serving process has warmed up: collect, and hand freed heap
    pages back to the system (glibc keeps them otherwise, and the process's memory would not
    drop)."""
    gc.collect()
    trim_heap()


@contextmanager
def task() -> Iterator[None]:
    """One task running in this process (``tasks.base.ModelTask`` wraps every model task)."""
    global _running, _ended, _last_end
    with _lock:
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            _ended += 1
            _last_end = time.monotonic()


def trim_if_idle(quiet_s: float = QUIET_S) -> bool:
    """Trim when no task runs now, none ended in the last ``quiet_s`` seconds, and one ended
    since the last trim; True when it trimmed."""
    global _idle_trims, _handed_back_mib
    with _lock:
        if _running or _ended == _trimmed_at or time.monotonic() - _last_end < quiet_s:
            return False
    handed_back = trim_heap()
    if handed_back is None:
        return False
    with _lock:
        _idle_trims += 1
        _handed_back_mib += handed_back
    return True


def activity() -> tuple[int, int]:
    """(tasks running now, tasks ended) in this process."""
    with _lock:
        return _running, _ended


def stats() -> dict[str, float]:
    """This process's idle trims and the resident MiB they handed back, in all."""
    with _lock:
        return {"idle_trims": _idle_trims, "handed_back_mib": round(_handed_back_mib, 1)}
