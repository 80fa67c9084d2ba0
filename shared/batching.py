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
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    """``submit(item)`` blocks until ``fn`` has processed a batch that contains ``item``."""

    def __init__(
        self,
        fn: Callable[[list[In]], list[Out]],
        *,
        max_size: int = 32,
        window: float = 0.002,
        name: str = "micro-batcher",
        lanes: int = 1,
        lane_init: Callable[[], None] | None = None,
    ) -> None:
        """``lane_init()`` runs first in each lane's thread (e.g. to set its torch threads)."""
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.fn, self.max_size, self.window, self.lanes = fn, max_size, window, lanes
        self._lane_init = lane_init
        self._queue: queue.Queue[tuple[In, Future[Out]]] = queue.Queue()
        self._count = threading.Lock()  # lanes update the counters
        self.batches = 0
        self.items = 0
        self.largest = 0
        self.busy_seconds = 0.0  # time spent in ``fn``: its share of wall time is the load
        self._busy = False  # last batch had company: worth waiting a little for the next
        self._threads = [
            threading.Thread(
                target=self._run, name=f"{name}-{i}" if lanes > 1 else name, daemon=True
            )
            for i in range(lanes)
        ]
        for thread in self._threads:
            thread.start()

    def stats(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "items": self.items,
            "largest": self.largest,
            "busy_seconds": round(self.busy_seconds, 3),
            "lanes": self.lanes,
        }

    def submit(self, item: In, timeout: float | None = None) -> Out:
        return self.submit_many([item], timeout)[0]

    def submit_many(self, items: list[In], timeout: float | None = None) -> list[Out]:
        """Answers for ``items``, in order; they may run in several batches and lanes."""
        futures: list[Future[Out]] = []
        for item in items:
            future: Future[Out] = Future()
            self._queue.put((item, future))
            futures.append(future)
        deadline = None if timeout is None else time.monotonic() + timeout
        return [
            f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            for f in futures
        ]

    def _collect(self) -> list[tuple[In, Future[Out]]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + (self.window if self._busy else 0.0)
        while len(batch) < self.max_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        if self._lane_init is not None:
            self._lane_init()
        while True:
            batch = self._collect()
            self._busy = len(batch) > 1
            t0 = time.perf_counter()
            try:
                outputs = self.fn([item for item, _ in batch])
            except BaseException as exc:  # every waiter gets the error, the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
            finally:
                with self._count:
                    self.batches += 1
                    self.items += len(batch)
                    self.largest = max(self.largest, len(batch))
                    self.busy_seconds += time.perf_counter() - t0
            for (_, future), output in zip(batch, outputs, strict=True):
                future.set_result(output)


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
