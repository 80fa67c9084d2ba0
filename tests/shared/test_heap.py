"""shared.heap: the idle trim's bookkeeping, and what a trim hands back (glibc)."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from shared import heap

GLIBC = sys.platform == "linux"


def test_an_idle_trim_needs_a_task_that_ended_since_the_last_trim() -> None:
    heap.trim_heap()  # whatever earlier tests ran: trimmed now
    assert not heap.trim_if_idle(0)
    with heap.task():
        pass
    assert not heap.trim_if_idle(60)  # one ended, but not a minute ago: not quiet yet
    assert heap.trim_if_idle(0) is GLIBC
    assert not heap.trim_if_idle(0)  # nothing ended since


def test_no_idle_trim_while_a_task_runs() -> None:
    heap.trim_heap()
    with heap.task():
        pass
    started, release = threading.Event(), threading.Event()

    def running() -> None:
        with heap.task():
            started.set()
            release.wait(10)

    thread = threading.Thread(target=running)
    thread.start()
    try:
        assert started.wait(10)
        assert heap.activity()[0] == 1
        assert not heap.trim_if_idle(0)  # one ended, but another runs
    finally:
        release.set()
        thread.join(10)
    assert heap.activity()[0] == 0
    assert heap.trim_if_idle(0) is GLIBC


PROBE = """
import ctypes, os
from shared import heap

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # a large block freed: glibc now keeps up to 32 MiB of free heap
blocks = [libc.malloc(1 << 20) for _ in range(24)]  # as a forward pass's buffers: from the heap
for block in blocks:
    ctypes.memset(block, 1, 1 << 20)
for block in reversed(blocks):
    libc.free(block)
kept = resident_mib()
with heap.task():
    pass
assert heap.trim_if_idle(0)
print(round(kept - resident_mib(), 1))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc malloc")
def test_an_idle_trim_hands_back_what_a_process_freed() -> None:
    """24 MiB freed after a large block: without a trim glibc keeps it resident."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert float(out.stdout) >= 20, out.stdout + out.stderr
