"""Moving a running fleet from Redis to RabbitMQ as docs/operations.md describes: a new node on
RabbitMQ beside the old one on Redis (one registry, one result store), the senders moved over
while tasks keep coming, the old queue drained, then the old node stopped. No task is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from harness import WorkerProcess, close_app, wait_for
from harness.brokers import Broker, RabbitVhost
from tests.reliability.tools import (
    Tally,
    client_app,
    log_counts,
    queue_drained,
    read_results,
    seg_manifest,
    wait_final,
)
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
PER_PHASE = 100


def test_a_fleet_moves_from_redis_to_rabbitmq_without_losing_a_task(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, rabbitmq_vhost: RabbitVhost
) -> None:
    url = private_redis.url
    rabbit = Broker("amqp", rabbitmq_vhost)
    client = redis.Redis.from_url(url)
    env = {"MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path))}
    old = start_worker(redis_url=url, concurrency=1, env=env)
    old.wait_ready(1, timeout=120)
    on_redis = client_app(url, old.queue)
    on_rabbit = client_app(url, old.queue, rabbit)
    ids: list[str] = []
    t0 = time.monotonic()

    def send(app: object, n: int) -> None:
        for i in range(n):
            row = [[0.1, 0.2, float(len(ids) + i)]]
            ids.append(app.send_task("clustering.assign", args=[row], kwargs={"model": "seg"}).id)  # type: ignore[attr-defined]

    try:
        send(on_redis, PER_PHASE)  # the fleet as it was
        # 1. a new node on RabbitMQ, same Redis, prefix and queue name
        new = start_worker(
            redis_url=url,
            broker_url=rabbit.url(url),
            concurrency=1,
            env=env,
            prefix=old.prefix,
            node=f"new-{old.node}",
        )
        new.wait_ready(1, timeout=120)
        nodes = {s["node"] for s in old.snapshots()}
        assert nodes == {old.node, new.node}  # one registry for both fleets
        # 2. the senders move over in a rolling restart: both brokers get tasks for a while
        for _ in range(PER_PHASE // 10):
            send(on_redis, 5)
            send(on_rabbit, 5)
        send(on_rabbit, PER_PHASE)
        # 3. the old broker drains: nothing waiting, nothing unacknowledged
        wait_for(lambda: queue_drained(client, old.queue), 120, "the Redis queue drained")
        # 4. only then the old node stops (warm shutdown); tasks keep coming on RabbitMQ
        old.stop()
        send(on_rabbit, PER_PHASE)
        results = wait_final(client, ids, 180, "every task of the move")
    finally:
        close_app(on_redis)
        close_app(on_rabbit)
    tally = Tally.count(
        "broker move Redis -> RabbitMQ, old node drained then stopped",
        ids,
        read_results(client, ids),
        [old, new],
        t0,
    ).report()
    assert tally.lost == 0 and tally.failed == 0
    statuses = [results[i]["status"] for i in ids]
    assert statuses.count("SUCCESS") == len(ids) == 4 * PER_PHASE
    assert sorted(read_results(client, ids)) == sorted(ids)
    served_old, _ = log_counts([old], ids)
    served_new, _ = log_counts([new], ids)
    assert len(served_old) >= PER_PHASE  # the first phase at least went through Redis
    assert len(served_new) >= 2 * PER_PHASE  # the last two phases only through RabbitMQ
    assert set(served_old) | set(served_new) == set(ids)
    assert wait_for(lambda: rabbit.queue_empty(client, old.queue), 30, "RabbitMQ drained")
    client.close()
