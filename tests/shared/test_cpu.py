"""shared.cpu: the idle cores a pool process may borrow, read from its siblings' states in
/proc. Each case runs in a process of its own (a stand-in for a worker's main process) whose
two children are the pool processes: one asleep or spinning, one asking."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from typing import Any

import pytest

from shared import cpu

CORES = len(os.sched_getaffinity(0))


def ask_beside(sibling: str) -> dict[str, Any]:
    """Fork a stand-in main process; its first child sleeps or spins (``sibling``), its second
    enables borrowing (one thread) and reports ``running_siblings`` and ``borrowable``. Every
    process is bounded (the spinner stops after 30 s) and reaped; the answer comes within 30 s."""
    read, write = os.pipe()
    main = os.fork()
    if main == 0:  # pragma: no cover - the stand-in main process
        code = 1
        try:
            first = os.fork()
            if first == 0:
                if sibling == "spinning":
                    end = time.monotonic() + 30
                    while time.monotonic() < end:
                        pass
                else:
                    time.sleep(30)
                os._exit(0)
            time.sleep(0.3)  # the first child is asleep or spinning by now
            second = os.fork()
            if second == 0:
                cpu.enable(1)
                answer = {"running": cpu.running_siblings(), "borrowable": cpu.borrowable()}
                cpu.disable()
                answer["disabled"] = cpu.borrowable()
                os.write(write, json.dumps(answer).encode())
                os._exit(0)
            os.waitpid(second, 0)
            os.kill(first, signal.SIGKILL)
            os.waitpid(first, 0)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        assert ready, "no answer within 30 s"
        return dict(json.loads(os.read(read, 4096)))
    finally:
        os.close(read)
        deadline = time.monotonic() + 30
        while os.waitpid(main, os.WNOHANG)[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if time.monotonic() >= deadline:  # pragma: no cover - a stuck stand-in
            os.kill(main, signal.SIGKILL)
            os.waitpid(main, 0)


def test_nothing_is_borrowed_until_enabled() -> None:
    cpu.disable()
    assert cpu.borrowable() == 0


def test_an_idle_sibling_leaves_its_core_to_borrow() -> None:
    answer = ask_beside("asleep")
    assert answer == {"running": 0, "borrowable": CORES - 1, "disabled": 0}


@pytest.mark.skipif(CORES < 2, reason="one core: nothing to borrow either way")
def test_a_running_sibling_keeps_its_core() -> None:
    answer = ask_beside("spinning")
    assert answer == {"running": 1, "borrowable": CORES - 2, "disabled": 0}
