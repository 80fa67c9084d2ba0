"""Micro-batching: many concurrent single-item requests, one forward pass.

Greedy, after the adaptive batchers of model servers: a lane (a thread) takes the first waiting
request, then every request that queued up meanwhile (up to ``max_size``), and runs them as one
batch. A lone request is never held back. Once batches of more than one show up (load), the
lane also waits up to ``window`` seconds to fill the next batch. With several ``lanes``, one
batch runs while the next fills and then runs beside it (data parallel inside one process: on a
CPU, two lanes of one torch thread each beat one batch on two threads, docs/architecture.md).
Useful where several tasks run at once inside one process (the threads pool); a prefork child
runs one task at a time and calls the model directly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchPolicy:
    """How a serving process batches concurrent requests (the BATCH_* settings)."""

    max_size: int = 32
    window: float = 0.002  # seconds a busy lane waits to fill its next batch
    lanes: int = 0  # batches that run side by side; 0: decided by ``plan``
    threads: int = 1  # the process's torch threads, shared out among the lanes

    def plan(self, device: str) -> tuple[int, int]:
        """(lanes, torch threads per lane): ``lanes``, or on a CPU with two or more threads two
        lanes that split them (two one-thread lanes outran one two-thread batch on a CPU,
        docs/architecture.md), one lane on CUDA (one large batch)."""
        lanes = self.lanes or (1 if device.startswith("cuda") or self.threads < 2 else 2)
        return lanes, max(1, self.threads // lanes)


class BatchError(RuntimeError):
    """A batch function broke its contract (e.g. returned a different number of results)."""


class BatcherClosed(RuntimeError):
    """The micro-batcher was closed (its process is shutting down)."""


_CLOSE = object()  # put on the queue once per lane by close()


class MicroBatcher(Generic[In, Out]):
    """``submit(item)`` blocks until ``fn`` has processed a batch that contains ``item``.

    Whatever ``fn`` does, a lane lives on: an exception, or a result list of the wrong length,
    fails only the requests of that batch, at once. A waiter gives up after its ``timeout``
    (raising ``on_timeout()``); a lane that has been inside ``fn`` longer than ``stuck_after``
    seconds by then is replaced by a new lane, and retires when ``fn`` finally returns.
    """

    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        *,
        max_size: int = 32,
        window: float = 0.002,
        name: str = "micro-batcher",
        lanes: int = 1,
        lane_init: Callable[[], None] | None = None,
        stuck_after: float | None = None,
        on_timeout: Callable[[], BaseException] | None = None,
    ) -> None:
        """``lane_init()`` runs first in each lane's thread (e.g. to set its torch threads)."""
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.fn, self.max_size, self.window, self.lanes = fn, max_size, window, lanes
        self.name = name
        self.stuck_after = stuck_after
        self._on_timeout = on_timeout or (lambda: TimeoutError(f"{name}: no answer in time"))
        self._lane_init = lane_init
        self._queue: queue.Queue[Any] = queue.Queue()
        self._count = threading.Lock()  # lanes update the counters
        self.batches = 0
        self.items = 0
        self.largest = 0
        self.failed_batches = 0
        self.replaced_lanes = 0
        self.busy_seconds = 0.0  # time spent in ``fn``: its share of wall time is the load
        self._busy = False  # last batch had company: worth waiting a little for the next
        self._closed = False
        self._lanes: dict[threading.Thread, float | None] = {}  # lane -> when its batch began
        self._retired: set[threading.Thread] = set()
        self._serial = 0
        for _ in range(lanes):
            self._start_lane()

    def _start_lane(self) -> None:
        self._serial += 1
        label = f"{self.name}-{self._serial}" if self.lanes > 1 or self._serial > 1 else self.name
        thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._lanes[thread] = None
        thread.start()

    def stats(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest": self.largest,
            "busy_seconds": round(self.busy_seconds, 3),
            "lanes": self.lanes,
            "failed_batches": self.failed_batches,
            "replaced_lanes": self.replaced_lanes,
        }

    def submit(self, item: In, timeout: float | None = None) -> Out:
        return self.submit_many([item], timeout)[0]

    def submit_many(self, items: list[In], timeout: float | None = None) -> list[Out]:
        """Answers for ``items``, in order; they may run in several batches and lanes."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is closed")
        futures: list[Future[Out]] = []
        for item in items:
            future: Future[Out] = Future()
            self._queue.put((item, future))
            futures.append(future)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [
                f.result(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
                )
                for f in futures
            ]
        except FutureTimeout:
            for f in futures:
                f.cancel()  # a lane that reaches it later skips it
            self._replace_stuck_lanes()
            raise self._on_timeout() from None

    def _replace_stuck_lanes(self) -> None:
        if self.stuck_after is None:
            return
        now = time.monotonic()
        with self._count:
            stuck = [
                t
                for t, began in self._lanes.items()
                if began is not None and now - began > self.stuck_after and t not in self._retired
            ]
            for thread in stuck:
                self._retired.add(thread)
                self.replaced_lanes += 1
                self._start_lane()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the lanes (waiting up to ``timeout`` for batches in progress); requests still
        queued fail with BatcherClosed."""
        if self._closed:
            return
        self._closed = True
        for _ in range(len(self._lanes)):
            self._queue.put(_CLOSE)
        deadline = time.monotonic() + timeout
        for thread in list(self._lanes):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not _CLOSE:
                entry[1].set_exception(BatcherClosed(f"{self.name} is closed"))

    def _collect(self, first: tuple[In, Future[Out]]) -> list[tuple[In, Future[Out]]]:
        batch = [first]
        deadline = time.monotonic() + (self.window if self._busy else 0.0)
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                entry = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if entry is _CLOSE:
                self._queue.put(_CLOSE)  # for this lane's next round
                break
            batch.append(entry)
        return batch

    def _run(self) -> None:
        me = threading.current_thread()
        if self._lane_init is not None:
            self._lane_init()
        while me not in self._retired:
            entry = self._queue.get()
            if entry is _CLOSE:
                break
            batch = [(item, f) for item, f in self._collect(entry) if not f.cancelled()]
            if not batch:
                continue
            self._busy = len(batch) > 1
            t0 = time.perf_counter()
            with self._count:
                self._lanes[me] = time.monotonic()
            try:
                outputs = self.fn([item for item, _ in batch])
                if not isinstance(outputs, list) or len(outputs) != len(batch):
                    got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
                    raise BatchError(
                        f"{self.name}: the batch function returned {got} results "
                        f"for {len(batch)} inputs"
                    )
            except BaseException as exc:  # every waiter gets the error, the lane lives on
                error = exc if isinstance(exc, Exception) else BatchError(repr(exc))
                for _, future in batch:
                    if future.set_running_or_notify_cancel():
                        future.set_exception(error)
                failed = True
            else:
                for (_, future), output in zip(batch, outputs, strict=True):
                    if future.set_running_or_notify_cancel():
                        future.set_result(output)
                failed = False
            finally:
                with self._count:
                    self._lanes[me] = None
                    self.batches += 1
                    self.items += len(batch)
                    self.largest = max(self.largest, len(batch))
                    self.busy_seconds += time.perf_counter() - t0
            if failed:
                with self._count:
                    self.failed_batches += 1
        with self._count:
            self._lanes.pop(me, None)
            self._retired.discard(me)


def pad_groups(lengths: list[int], ratio: float) -> list[list[int]]:
    """Split a batch into length-sorted groups whose padded size stays within ``ratio`` of
    their real size: ``len(group) * longest <= ratio * sum(lengths in group)``.

    Returns the indices of ``lengths``, every index exactly once, each group in ascending
    length. ``ratio <= 0`` (or a single item) keeps the whole batch as one group, in order. On a
    CPU a padded token costs as much as a real one, so a batch of mixed lengths runs faster as a
    few tighter forward passes than as one padded to its longest text.
    """
    if ratio <= 0 or len(lengths) <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = [[]]
    real = 0
    for i in order:
        group = groups[-1]
        n = lengths[i]  # the longest so far: ascending order
        if group and (len(group) + 1) * n > ratio * (real + n):
            groups.append([i])
            real = n
        else:
            group.append(i)
            real += n
    return groups
