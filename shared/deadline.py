"""A time limit on a block of code in the calling thread: a model's inference.

``with time_limit(seconds, make_error): ...`` raises ``make_error()`` inside the block once it has
run ``seconds``. How it interrupts depends on the thread:

* the main thread (a prefork pool process, the solo pool): ``SIGALRM`` from ``setitimer``; the
  handler raises, which also ends a ``time.sleep`` or a blocking wait;
* any other thread (the threads pool, a micro-batcher lane): a watchdog thread raises the error
  in the late thread (``PyThreadState_SetAsyncExc``), which takes effect at its next bytecode.

Either way, code stuck inside one native call (a C extension that never returns to Python) is
interrupted only when that call returns: Celery's hard task time limit stays the backstop there,
and callers that wait on another thread (the micro-batcher) stop waiting at the limit anyway.
"""

from __future__ import annotations

import _signal
import ctypes
import heapq
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class _Expired(BaseException):
    """Raised into the late block; turned into the caller's error on the way out. A
    BaseException so that the block's own ``except Exception`` cannot swallow it."""


@contextmanager
def time_limit(seconds: float | None, make_error: Callable[[], BaseException]) -> Iterator[None]:
    """Run the block with a limit of ``seconds`` (None or <= 0: no limit)."""
    if not seconds or seconds <= 0:
        yield
        return
    if threading.current_thread() is threading.main_thread():
        limiter = _alarm(seconds)
    else:
        limiter = _WATCHDOG.limit(seconds)
    try:
        with limiter:
            yield
    except _Expired:
        raise make_error() from None


_ARMED = [False]  # a main-thread block is running under the alarm


def _on_alarm(signum: int, frame: object) -> None:
    if _ARMED[0]:  # the block may have ended between the alarm and this handler
        raise _Expired


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    # The handler is installed once and stays (an alarm outside a block is ignored); the C
    # functions under ``signal`` skip its enum conversions: this runs once per inference.
    if _signal.getsignal(signal.SIGALRM) is not _on_alarm:
        _signal.signal(signal.SIGALRM, _on_alarm)
    _ARMED[0] = True
    _signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        _ARMED[0] = False
        _signal.setitimer(signal.ITIMER_REAL, 0)


def _raise_in(thread_id: int, exc_type: type[BaseException] | None) -> int:
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc))


class _Watchdog:
    """One daemon thread per process that raises ``_Expired`` in threads past their limit."""

    def __init__(self) -> None:
        self._tokens = itertools.count()
        self.reset()

    def reset(self) -> None:
        """Fresh state: at start, and in a forked child (which inherits no thread, and maybe a
        lock held by a parent thread at fork time)."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._due: list[tuple[float, int, int]] = []  # (deadline, token, thread id)
        self._live: set[int] = set()
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        token = next(self._tokens)
        with self._lock:
            self._ensure_thread()
            self._live.add(token)
            heapq.heappush(self._due, (time.monotonic() + seconds, token, threading.get_ident()))
            self._wake.notify()
        try:
            yield
        finally:
            with self._lock:
                self._live.discard(token)
                if token in self._fired:  # fired, maybe not yet raised: never raise it later
                    self._fired.discard(token)
                    _raise_in(threading.get_ident(), None)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="time-limits", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._due and (self._due[0][1] not in self._live or self._due[0][0] <= now):
                    deadline, token, thread_id = heapq.heappop(self._due)
                    if token in self._live and deadline <= now:
                        self._fired.add(token)
                        _raise_in(thread_id, _Expired)
                timeout = self._due[0][0] - now if self._due else None
                self._wake.wait(timeout)


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)
