"""A burst: 10,000 small tasks enqueued at once against one node (2 pool processes, the real
models). All complete, none is lost, and the node's memory (main process + pool, RSS) stays
bounded while the queue drains."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import suppress

import psutil
import pytest
import redis

from harness import WorkerProcess, close_app, wait_for
from tests.conftest import REPOSITORY
from tests.reliability.tools import Tally, client_app, queue_drained, wait_final
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

TASKS = 10_000
RSS_BOUND = 3 * 2**30  # bytes, main process + pool processes


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree every ``every`` seconds; keeps the maximum."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self.samples = 0
        self.stopping = threading.Event()

    def total(self) -> int:
        root = psutil.Process(self.pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            with suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def run(self) -> None:
        while not self.stopping.is_set():
            with suppress(psutil.Error):
                self.peak = max(self.peak, self.total())
                self.samples += 1
            self.stopping.wait(self.every)


def test_ten_thousand_tasks_at_once_all_complete_in_bounded_memory(
    start_worker: Start, private_redis: EmbeddedRedis
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    worker = start_worker(
        redis_url=url, concurrency=2, env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)}
    )
    worker.wait_ready(2, timeout=180)
    sampler = RssSampler(worker.pid)
    baseline = sampler.total()
    sampler.start()
    app = client_app(url, worker.queue)
    try:
        t0 = time.monotonic()
        row = [[10.0, 5.0, 300.0, 12.0]]
        ids = [app.send_task("clustering.assign", args=[row]).id for _ in range(TASKS)]
        enqueued = time.monotonic() - t0
        results = wait_final(client, ids, 240, f"{TASKS} tasks", interval=1.0)
        drained = time.monotonic() - t0
        wait_for(lambda: queue_drained(client, worker.queue), 30, "queue and unacked drained")
    finally:
        sampler.stopping.set()
        sampler.join(timeout=5)
        close_app(app)
    tally = Tally.count(
        "burst of 10,000 clustering.assign",
        ids,
        results,
        [worker],
        t0,
        enqueue_s=round(enqueued, 1),
        drain_s=round(drained, 1),
        tasks_per_s=round(TASKS / drained),
        rss_baseline_mib=round(baseline / 2**20),
        rss_peak_mib=round(sampler.peak / 2**20),
        rss_samples=sampler.samples,
    )
    tally.report()
    client.close()

    assert tally.sent == TASKS
    assert tally.completed == TASKS and tally.failed == 0 and tally.lost == 0
    assert tally.redelivered == 0 and tally.duplicated == 0
    assert sampler.samples > 0 and sampler.peak < RSS_BOUND
    assert {r["result"]["labels"][0] for r in results.values()} == {
        next(iter(results.values()))["result"]["labels"][0]
    }  # same row, same answer, every time
