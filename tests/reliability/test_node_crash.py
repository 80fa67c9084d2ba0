"""A whole worker node SIGKILLed (main process and pool, ``killpg``) with tasks in flight.

The Redis transport keeps every delivered, unacknowledged message in the ``unacked`` hash with
its delivery time in the ``unacked_index`` sorted set (one pair per Redis database, shared by
every queue). Nothing is pushed back when a node dies: a *consuming* worker restores the entries
older than its own ``visibility_timeout`` in ``QoS.restore_visible``, which kombu runs once when
the consumer starts (``on_poll_init``) and then from a timer every ``unacked_restore_interval``
seconds (default 10), scanning only on every ``unacked_restore_throttle``-th tick (default 10).
A publisher never scans, so a client needs no visibility_timeout of its own.

RabbitMQ (the ``broker`` parameter: BROKER_URL=amqp://..., tests/conftest.py) needs no sweep: it
returns a consumer's unacknowledged messages to the queue as soon as its connection closes, and
the process that held it is dead, so the kernel closes it at once.

These workers run with VISIBILITY_TIMEOUT_SECONDS=20 instead of the 300 s default, so that a
redelivery can be observed within a test (and TASK_TIME_LIMIT_SECONDS=15: the settings require the
task time limit to stay below the visibility timeout).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from harness import WorkerProcess, close_app, wait_for
from harness.brokers import Broker
from tests.reliability.tools import (
    Misbehaviour,
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

VISIBILITY = 20
TIME_LIMIT = 15  # soft limit 5 s: the tasks here take well under 1 s
TASKS = 16


def node_env(manifest: Path) -> dict[str, str]:
    return {
        "MODELWORKERS_MODEL_MANIFEST": str(manifest),
        "MODELWORKERS_VISIBILITY_TIMEOUT_SECONDS": str(VISIBILITY),
        "MODELWORKERS_TASK_TIME_LIMIT_SECONDS": str(TIME_LIMIT),
        # Two nodes = 4 pool processes on this 2-core machine. Each pool process runs OpenMP /
        # OpenBLAS with one thread per core (OMP_NUM_THREADS set in the child comes too late:
        # the libraries were initialised in the parent by the preimport), and the spinning
        # threads make a 30 ms KMeans fit take seconds, past the soft time limit. Not what this
        # test is about: one thread per process here (the bug is in docs/reliability.md).
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        # STARTED records show which tasks a node holds when it dies
        "MODELWORKERS_TRACK_STARTED": "1",
    }


def send_slow_tasks(app: Celery, n: int) -> list[str]:
    """clustering.fit of 40 clusters on 5,000 rows: long enough (~0.3 s) to be caught in flight,
    far below the 5 s soft time limit."""
    rng = random.Random(2)
    rows = [[rng.random(), rng.random(), rng.random()] for _ in range(5000)]
    return [app.send_task("clustering.fit", args=[rows, 40]).id for _ in range(n)]


def done_at(result: dict[str, Any]) -> float:
    """The result's date_done (ISO 8601, UTC) as a Unix time."""
    stamp = datetime.fromisoformat(result["date_done"])
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def kill_with_tasks_in_flight(
    node: WorkerProcess, client: redis.Redis, ids: list[str]
) -> tuple[set[str], float]:
    """Wait until both pool processes of ``node`` run one of ``ids``, then SIGKILL the node.
    Returns the ids the node had received and not completed when it died, and the kill time."""

    def both_running() -> bool:
        children = set(node.children_pids())
        running = {
            r["result"]["pid"]
            for r in read_results(client, ids).values()
            if r["status"] == "STARTED"
        }
        return len(children & running) == 2

    wait_for(both_running, 60, f"2 tasks running on {node.node}")
    node.kill()
    killed_at = time.time()
    received, _ = log_counts([node], ids)
    done = {i for i, r in read_results(client, ids).items() if r["status"] == "SUCCESS"}
    return set(received) - done, killed_at


def unacked_ids(client: redis.Redis) -> set[str]:
    """Task ids delivered but not acknowledged (by any node): each entry of the ``unacked`` hash
    is [message, exchange, routing_key], the task id is in the message headers."""
    return {json.loads(raw)[0]["headers"]["id"] for raw in client.hvals("unacked")}


def test_tasks_of_a_killed_node_are_redelivered_to_a_new_node(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, broker: Broker
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    env = node_env(seg_manifest(tmp_path))
    node_a = start_worker(redis_url=url, broker_url=broker.url(url), concurrency=2, env=env)
    node_a.wait_ready(2, timeout=120)
    app = client_app(url, node_a.queue, broker)
    t0 = time.monotonic()
    ids = send_slow_tasks(app, TASKS)
    held_ids, killed_at = kill_with_tasks_in_flight(node_a, client, ids)
    assert not node_a.alive()
    assert 1 <= len(held_ids) <= 2  # prefetch multiplier 1 x concurrency 2
    if broker.vhost is None:
        assert unacked_ids(client) == held_ids  # the only node: all unacked messages were its own
        # An operator (or an orchestrator) starts a new node once the dead one's deliveries are
        # past the visibility timeout: its consumer restores them when it starts polling.
        wait_for(
            lambda: client.zcount("unacked_index", time.time() - VISIBILITY, "+inf") == 0,
            VISIBILITY + 10,
            "the dead node's deliveries to pass the visibility timeout",
            interval=0.2,
        )
    else:  # RabbitMQ took the dead node's messages back: every task not done waits in the queue
        done = sum(1 for r in read_results(client, ids).values() if r["status"] == "SUCCESS")
        wait_for(
            lambda: (
                broker.vhost is not None and broker.vhost.messages(node_a.queue) == TASKS - done
            ),
            30,
            "RabbitMQ to hold every task not done",
            interval=0.5,
        )
    node_b = start_worker(
        redis_url=url,
        broker_url=broker.url(url),
        concurrency=2,
        env=env,
        prefix=node_a.prefix,
        node=f"b-{node_a.node}",
    )
    node_b.wait_ready(2, timeout=120)
    results = wait_final(client, ids, 90, "every task, the dead node's included")
    wait_for(lambda: queue_drained(client, node_a.queue, broker), 30, "queue and unacked drained")
    tally = Tally.count(
        "node SIGKILL, new node after visibility timeout"
        if broker.vhost is None
        else "node SIGKILL, new node (broker amqp)",
        ids,
        read_results(client, ids),
        [node_a, node_b],
        t0,
        held_by_dead_node=len(held_ids),
        seconds_kill_to_redelivered_done=round(
            max(done_at(results[i]) for i in held_ids) - killed_at, 1
        ),
        visibility_timeout_s=VISIBILITY if broker.vhost is None else None,
    )
    tally.report()
    close_app(app)
    client.close()

    assert tally.completed == TASKS and tally.failed == 0 and tally.lost == 0
    assert all(r["status"] == "SUCCESS" for r in results.values())
    # the two tasks the dead node held ran again on node B; nothing else ran twice
    received_b, _ = log_counts([node_b], held_ids)
    assert set(received_b) == held_ids
    assert tally.redelivered == len(held_ids)


def test_a_running_node_takes_over_a_dead_nodes_tasks_within_the_visibility_timeout(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, broker: Broker
) -> None:
    """Two nodes on one queue; one dies with tasks in flight. The survivor must receive them
    within the visibility timeout plus a small sweep delay (here: VISIBILITY + 15 s). RabbitMQ
    returns them as soon as the dead node's connection closes; the survivor takes them once a
    pool process of its own is free (bound: 30 s on this loaded 2-core machine)."""
    url = private_redis.url
    client = redis.Redis.from_url(url)
    env = node_env(seg_manifest(tmp_path))
    node_a = start_worker(redis_url=url, broker_url=broker.url(url), concurrency=2, env=env)
    node_b = start_worker(
        redis_url=url,
        broker_url=broker.url(url),
        concurrency=2,
        env=env,
        prefix=node_a.prefix,
        node=f"b-{node_a.node}",
    )
    node_a.wait_ready(2, timeout=120)
    node_b.wait_ready(2, timeout=120)
    app = client_app(url, node_a.queue, broker)
    t0 = time.monotonic()
    ids = send_slow_tasks(app, TASKS)
    held_ids, killed_at = kill_with_tasks_in_flight(node_a, client, ids)
    assert 1 <= len(held_ids) <= 2  # the precondition: the dead node held tasks
    bound = VISIBILITY + 15 if broker.vhost is None else 30
    try:
        # the dead node's tasks must reach the survivor within the bound (delivery, not
        # completion: how fast the survivor then works through the queue is another matter)
        try:
            wait_for(
                lambda: held_ids <= set(log_counts([node_b], held_ids)[0]),
                max(1.0, bound - (time.time() - killed_at)),
                f"the dead node's tasks to be redelivered within {bound} s of the kill",
                interval=0.2,
            )
        except TimeoutError as exc:
            raise Misbehaviour(str(exc)) from None
        redelivered_after = time.time() - killed_at
        results = wait_final(client, ids, 120, "every task")
    finally:
        tally = Tally.count(
            f"node SIGKILL, surviving node takes over (broker {broker.kind})",
            ids,
            read_results(client, ids),
            [node_a, node_b],
            t0,
            held_by_dead_node=len(held_ids),
            waited_s=round(time.time() - killed_at, 1),
            bound_s=bound,
            visibility_timeout_s=VISIBILITY if broker.vhost is None else None,
        )
        tally.report()
        close_app(app)
        client.close()
    assert redelivered_after <= bound
    assert all(r["status"] == "SUCCESS" for r in results.values())
    assert tally.completed == TASKS and tally.lost == 0
