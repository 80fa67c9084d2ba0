"""Micro-batching: many concurrent single-item requests, one forward pass.

Greedy, after the adaptive batchers of model servers: one thread takes the first waiting
request, then every request that queued up meanwhile (up to ``max_size``), and runs them as one
batch. A lone request is never held back. Once batches of more than one show up (load), the
thread also waits up to ``window`` seconds to fill the next batch. Useful where several tasks
run at once inside one process (the threads pool); a prefork child runs one task at a time and
calls the model directly.
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
    ) -> None:
        self.fn, self.max_size, self.window = fn, max_size, window
        self._queue: queue.Queue[tuple[In, Future[Out]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.batches = 0
        self.items = 0
        self.largest = 0
        self._busy = False  # last batch had company: worth waiting a little for the next

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest}

    def submit(self, item: In, timeout: float | None = None) -> Out:
        future: Future[Out] = Future()
        self._queue.put((item, future))
        return future.result(timeout=timeout)

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
        while True:
            batch = self._collect()
            self._busy = len(batch) > 1
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            try:
                outputs = self.fn([item for item, _ in batch])
            except BaseException as exc:  # every waiter gets the error, the thread lives on
                for _, future in batch:
                    future.set_exception(exc)
                continue
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
