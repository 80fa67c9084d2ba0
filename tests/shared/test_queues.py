"""Queue depth and oldest waiting message, read from a real Redis the way kombu lays queues out."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness import close_app
from shared.metrics import QueueCollector
from shared.queues import PRIORITY_SEP, message_id, queue_lists, queue_stats
from workers.embedded import free_port


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def envelope(tag: str) -> bytes:
    return json.dumps({"body": "", "headers": {"id": tag}, "properties": {"delivery_tag": tag}})


def test_queue_lists_follow_kombus_priority_layout() -> None:
    assert queue_lists("q") == ["q", f"q{PRIORITY_SEP}3", f"q{PRIORITY_SEP}6", f"q{PRIORITY_SEP}9"]
    assert queue_lists("q", [0]) == ["q"]
    assert message_id(envelope("abc")) == "abc"
    assert message_id(b"not json").startswith("sha1:")


def test_depth_counts_every_priority_list_as_kombu_does(
    redis_url: str, client: redis.Redis
) -> None:
    """Messages published by Celery itself, with and without priorities: the depth is what
    kombu's transport reports as the queue's size."""
    queue = f"q-{uuid.uuid4().hex[:8]}"
    app = Celery(broker=redis_url)
    app.conf.update(task_default_queue=queue, broker_transport_options={"priority_steps": [0, 3]})
    try:
        for i in range(5):
            app.send_task("nobody.runs", args=[i], priority=0)
        for i in range(3):
            app.send_task("nobody.runs", args=[i], priority=9)
        with app.connection_for_write() as conn:
            kombu_size = conn.default_channel._size(queue)
    finally:
        close_app(app)
    assert client.llen(queue) == 5 and client.llen(f"{queue}{PRIORITY_SEP}3") == 3
    [stats] = queue_stats(client, [queue], "mwtest", priority_steps=[0, 3])
    assert stats.depth == kombu_size == 8
    [default_steps] = queue_stats(client, [queue], "mwtest")
    assert default_steps.depth == 8
    client.delete(queue, f"{queue}{PRIORITY_SEP}3")


def test_oldest_age_is_how_long_the_tail_has_been_seen(client: redis.Redis) -> None:
    queue, prefix = f"q-{uuid.uuid4().hex[:8]}", f"p-{uuid.uuid4().hex[:8]}"
    [empty] = queue_stats(client, [queue], prefix)
    assert (empty.depth, empty.oldest_age_seconds) == (0, 0.0)

    client.lpush(queue, envelope("first"), envelope("second"))  # "first" is at the tail
    [seen] = queue_stats(client, [queue], prefix)
    assert seen.depth == 2 and seen.oldest_age_seconds < 0.5
    time.sleep(1.2)
    [later] = queue_stats(client, [queue], prefix)
    assert later.depth == 2 and later.oldest_age_seconds >= 1.0
    # another reader (another node, the CLI) reports the same wait: it is kept in Redis
    [other] = queue_stats(redis.Redis(connection_pool=client.connection_pool), [queue], prefix)
    assert other.oldest_age_seconds >= 1.0

    client.rpop(queue)  # "first" consumed: "second" is the oldest now, first seen now
    [moved] = queue_stats(client, [queue], prefix)
    assert moved.depth == 1 and moved.oldest_age_seconds < 0.5
    client.rpop(queue)
    [done] = queue_stats(client, [queue], prefix)
    assert (done.depth, done.oldest_age_seconds) == (0, 0.0)
    assert not client.hexists(f"{prefix}:queue-tails", queue)


def test_the_collector_answers_with_the_queues_and_without_them_when_redis_is_down(
    client: redis.Redis,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    queue = f"q-{uuid.uuid4().hex[:8]}"
    client.lpush(queue, envelope("a"), envelope("b"), envelope("c"))
    registry = CollectorRegistry()
    registry.register(QueueCollector(client, [queue], "mwtest"))
    text = generate_latest(registry).decode()
    assert f'modelworkers_queue_depth{{queue="{queue}"}} 3.0' in text
    assert f'modelworkers_queue_oldest_age_seconds{{queue="{queue}"}}' in text
    client.delete(queue)

    # no retries: the time bound below is the collector's, not redis-py's backoff
    down = redis.Redis(
        port=free_port(),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    broken = CollectorRegistry()
    broken.register(QueueCollector(down, [queue], "mwtest"))
    started = time.monotonic()
    assert "modelworkers_queue_depth" not in generate_latest(broken).decode()
    assert time.monotonic() - started < 5
