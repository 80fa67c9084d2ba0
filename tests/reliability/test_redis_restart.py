"""Redis restarted under a stream of tasks, with no worker restart.

A dedicated Redis (not the session's) on a fixed port is stopped mid-stream and a new, empty one
started on the same port. Redis here persists nothing, so what it held dies with it: queued
messages and stored results. Counted and reported, not asserted: the tasks sent before the
restart. Asserted: the worker and its pool processes stay up, their registry snapshots reappear
in the new Redis within a bound, and every task sent after the restart (by a fresh client and by
the long-lived client that sent before it) completes exactly once.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery

from harness import WorkerProcess, close_app, wait_for
from tests.reliability.tools import (
    Tally,
    client_app,
    log_counts,
    read_results,
    seg_manifest,
    statuses,
    wait_final,
)
from workers.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

BEFORE, AFTER_FRESH, AFTER_OLD = 120, 100, 20
HEARTBEAT_BOUND = 15.0


def send(app: Celery, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rows = [[rng.random(), rng.random(), rng.random()] for _ in range(100)]
    return [app.send_task("clustering.fit", args=[rows, 3]).id for _ in range(n)]


def test_workers_survive_a_redis_restart_and_serve_what_is_sent_after_it(
    start_worker: Start, tmp_path: Path
) -> None:
    port = free_port()
    servers = [EmbeddedRedis(port=port).start()]
    try:
        url = servers[0].url
        worker = start_worker(
            redis_url=url,
            concurrency=2,
            env={"MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path))},
        )
        first = worker.wait_ready(2, timeout=120)
        pool = set(worker.children_pids())
        assert {s["pid"] for s in first} == pool
        client = redis.Redis.from_url(url)
        old_app = client_app(url, worker.queue)
        t0 = time.monotonic()

        before = send(old_app, BEFORE, seed=1)
        wait_for(lambda: statuses(client, before)["SUCCESS"] >= 20, 60, "20 tasks done")
        done_in_old_redis = [
            i for i, r in read_results(client, before).items() if r["status"] == "SUCCESS"
        ]
        servers[0].stop()
        down_at = time.monotonic()
        wait_for(
            lambda: all(
                line in worker.log()
                for line in ("Connection to broker lost", "registry heartbeat failed")
            ),
            30,
            "the consumer and the heartbeat to notice that Redis is gone",
            interval=0.1,
        )
        servers.append(EmbeddedRedis(port=port).start())
        up_at = time.monotonic()

        # heartbeats resume: both pool processes' snapshots reappear in the empty Redis
        snaps = worker.wait_ready(2, timeout=HEARTBEAT_BOUND)
        heartbeat_after = time.monotonic() - up_at

        fresh_app = client_app(url, worker.queue)
        after = send(fresh_app, AFTER_FRESH, seed=2) + send(old_app, AFTER_OLD, seed=3)
        results = wait_final(client, after, 120, "every task sent after the restart")
        served_after = time.monotonic() - up_at

        pre_results = read_results(client, before)  # the new Redis: restored in-flight ones
        rerun_after = [i for i, r in pre_results.items() if r["status"] == "SUCCESS"]
        lost_before = [i for i in before if i not in done_in_old_redis and i not in rerun_after]
        log = worker.log()
        store_failed = set(re.findall(r"\[([0-9a-f-]{36})\] raised unexpected: network:", log))
        tally = Tally.count(
            "Redis restart (tasks sent after it)",
            after,
            results,
            [worker],
            t0,
            before_sent=BEFORE,
            before_done_then_result_lost_with_redis=len(done_in_old_redis),
            before_in_flight_restored_and_run=len(rerun_after),
            before_lost_with_the_queue=len(lost_before),
            before_in_flight_failed_storing_result=len(store_failed & set(before)),
            outage_s=round(up_at - down_at, 1),
            heartbeat_resumed_s=round(heartbeat_after, 1),
            all_after_done_s=round(served_after, 1),
        )
        tally.report()
        close_app(old_app)
        close_app(fresh_app)

        assert worker.alive() and set(worker.children_pids()) == pool  # no restart of anything
        assert {s["pid"] for s in snaps} == pool and all(s["ready"] for s in snaps)
        assert tally.sent == AFTER_FRESH + AFTER_OLD
        assert tally.completed == tally.sent and tally.failed == 0 and tally.lost == 0
        _, succeeded = log_counts([worker], after)
        assert tally.redelivered == 0 and tally.duplicated == 0
        assert set(succeeded) == set(after)
        assert "Timed out waiting for UP message" not in log
        assert heartbeat_after < HEARTBEAT_BOUND
        assert "registry heartbeat to Redis resumed" in log
        assert not store_failed & set(after)
        client.close()
    finally:
        for server in servers:
            server.close()
