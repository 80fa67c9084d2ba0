"""Redis run as docker-compose.yml runs it (AOF, ``appendfsync everysec``; the flags are read from
the compose file) keeps queued tasks across a restart.

1. 100 tasks queued with no worker; Redis stopped (SIGTERM) and started again on the same folder
   and port; then a worker starts: 100 of 100 complete.
2. The same Redis restarted again while that worker runs a stream of 100 tasks: every one
   completes (at least once: a task whose acknowledgement met the outage may run again), none
   lost, including a message the worker was taking as Redis stopped.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from celery import Celery

from harness import WorkerProcess, close_app, wait_for
from harness.durable import DurableRedis, compose_redis_flags
from tests.reliability.tools import (
    FINAL,
    Tally,
    client_app,
    read_results,
    seg_manifest,
    statuses,
    wait_final,
)

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
QUEUED, STREAM = 100, 100


def send(app: Celery, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rows = [[rng.random(), rng.random(), rng.random()] for _ in range(50)]
    return [app.send_task("clustering.fit", args=[rows, 3]).id for _ in range(n)]


def test_compose_runs_redis_with_aof_on_a_volume() -> None:
    flags = compose_redis_flags()
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"


def test_queued_tasks_survive_a_redis_restart(start_worker: Start, tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    server = DurableRedis(data).start()
    prefix = f"mwdurable-{random.randrange(16**8):08x}"
    try:
        client = redis.Redis.from_url(server.url)
        app = client_app(server.url, prefix)
        t0 = time.monotonic()
        queued = send(app, QUEUED, seed=1)
        assert client.llen(prefix) == QUEUED
        close_app(app)
        client.close()

        server.restart()  # SIGTERM, then a new redis-server on the same folder and port
        client = redis.Redis.from_url(server.url)
        assert client.llen(prefix) == QUEUED  # the AOF brought the queue back

        worker = start_worker(
            redis_url=server.url,
            prefix=prefix,
            concurrency=2,
            env={
                "MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)),
                # in-flight tasks whose acknowledgement met the second restart come back fast
                "MODELWORKERS_VISIBILITY_TIMEOUT_SECONDS": "10",
                "MODELWORKERS_TASK_TIME_LIMIT_SECONDS": "5",
            },
        )
        worker.wait_ready(2, timeout=120)
        results = wait_final(client, queued, 120, "the 100 tasks queued before the restart")
        first = Tally.count("durable Redis: queued, restarted", queued, results, [worker], t0)
        first.report()
        assert first.completed == QUEUED and first.failed == 0 and first.lost == 0

        # 2. a restart while the worker runs tasks
        app = client_app(server.url, prefix)
        t1 = time.monotonic()
        stream = send(app, STREAM, seed=2)
        wait_for(lambda: statuses(client, stream)["SUCCESS"] >= 10, 60, "10 tasks done")
        done_before = statuses(client, stream)["SUCCESS"]
        client.close()
        server.stop()
        down_at = time.monotonic()
        wait_for(
            lambda: "Connection to broker lost" in worker.log(),
            30,
            "the worker to notice that Redis is gone",
            interval=0.1,
        )
        server.start()
        outage = time.monotonic() - down_at
        client = redis.Redis.from_url(server.url)
        # A message the worker took as Redis stopped is registered as unacknowledged in the same
        # step (workers.receive): the visibility sweep brings it back if its reply was lost.
        # Every task must end, and nothing may stay queued or unacknowledged.
        with suppress(TimeoutError):
            wait_final(client, stream, 60, "the stream sent before the second restart")
        results = {i: r for i, r in read_results(client, stream).items() if r["status"] in FINAL}
        wait_for(
            lambda: client.llen(prefix) == 0 and client.hlen("unacked") == 0,
            30,
            "nothing left queued or unacknowledged",
        )
        second = Tally.count(
            "durable Redis: restarted under a running worker",
            stream,
            results,
            [worker],
            t1,
            done_before_restart=done_before,
            outage_s=round(outage, 1),
        )
        second.report()
        close_app(app)
        client.close()
        assert worker.alive()
        assert second.failed == 0 and second.lost == 0
        assert second.completed == STREAM
    finally:
        server.stop()
