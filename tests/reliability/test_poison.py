"""Poison tasks: a task whose every delivery kills the pool process running it.

Tasks are acks_late + reject_on_worker_lost, so such a task would be requeued and kill a process
forever. The worker counts the lost deliveries of each task id in Redis and, at
POISON_LOST_DELIVERIES (3), stores a PoisonTask FAILURE and acknowledges it instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from harness import WorkerProcess, close_app, wait_for
from tests.reliability.tools import client_app, queue_drained, seg_manifest, wait_final
from tests.workers.test_flower_metrics import metric
from workers.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
ROW = [[1.0, 2.0, 3.0]]
POISON = "tests.kill_own_process"
ASSIGN = "clustering.assign"


def poison_worker(
    start: Start, url: str, tmp_path: Path, metrics_port: int | None = None
) -> WorkerProcess:
    metrics = {"MODELWORKERS_METRICS_PORT": str(metrics_port)} if metrics_port else {}
    worker = start(
        redis_url=url,
        concurrency=2,
        env={"MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)), **metrics},
        extra_args=["-I", "tests.support.poison_tasks"],
    )
    worker.wait_ready(2, timeout=90)
    return worker


def test_a_task_that_kills_its_pool_process_fails_as_poison_after_three_deliveries(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    port = free_port()
    worker = poison_worker(start_worker, url, tmp_path, metrics_port=port)
    app = client_app(url, worker.queue)
    try:
        before = [app.send_task(ASSIGN, [ROW], {"model": "seg"}).id for _ in range(100)]
        poison = app.send_task(POISON).id
        after = [app.send_task(ASSIGN, [ROW], {"model": "seg"}).id for _ in range(100)]
    finally:
        close_app(app)
    results = wait_final(client, [*before, poison, *after], 120, "the stream and the poison task")

    normal = [results[i]["status"] for i in before + after]
    assert normal.count("SUCCESS") == 200, normal
    failure = results[poison]
    assert failure["status"] == "FAILURE"
    assert failure["result"]["exc_type"] == "PoisonTask"
    assert (
        f"{POISON}[{poison}] killed its pool process on 3 deliveries"
        in (failure["result"]["exc_message"][0])
    )
    assert int(client.get(f"{worker.prefix}:lost:{poison}") or 0) == 3
    wait_for(lambda: queue_drained(client, worker.queue), 20, "queue and unacked drained")
    log = worker.log()
    assert log.count(f"Task {POISON}[{poison}] received") == 3  # never a fourth delivery
    assert log.count("exited with 'signal 9 (SIGKILL)'") == 3
    assert worker.alive() and "Unrecoverable error" not in log
    worker.wait_ready(2, timeout=60)  # replacements serve
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert metric(text, "modelworkers_poison_tasks_total", task=POISON) == 1


def test_the_lost_delivery_count_is_kept_in_redis_across_node_restarts(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    """Two deliveries were lost on nodes that are gone; the third, on a new node, is the last."""
    url = private_redis.url
    client = redis.Redis.from_url(url)
    worker = poison_worker(start_worker, url, tmp_path)
    task_id = "poison-seen-twice-before"
    client.set(f"{worker.prefix}:lost:{task_id}", 2)
    app = client_app(url, worker.queue)
    try:
        app.send_task(POISON, task_id=task_id)
    finally:
        close_app(app)
    result = wait_final(client, [task_id], 60)[task_id]
    assert result["result"]["exc_type"] == "PoisonTask"
    assert "on 3 deliveries" in result["result"]["exc_message"][0]
    assert worker.log().count(f"Task {POISON}[{task_id}] received") == 1
