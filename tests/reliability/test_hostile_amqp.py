"""Hostile task messages published raw to RabbitMQ (BROKER_URL=amqp://...): each ends its one task,
never the node, as on Redis (test_hostile_messages.py).

On RabbitMQ there is no JSON envelope for kombu to decode (the AMQP frames are decoded by the
client library), so the envelope cases of the Redis tests have no equivalent; every check on the
task message itself (headers, body, size, depth, content type) runs in the worker's consumer for
either broker, and is exercised here over AMQP with messages published by kombu's producer with
no serializer in the way: the bytes, headers and content type are the test's.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection

from harness import WorkerProcess, close_app, wait_for
from harness.brokers import Broker, RabbitVhost
from tests.reliability.hostile import body, deep_json, nested, task_headers
from tests.reliability.tools import client_app, meta_key, seg_manifest
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
ROW = [[1.0, 2.0, 3.0]]


def cases() -> list[tuple[str, bytes, Any, str, str]]:
    """(case, body, headers, content type, text the stored error holds)."""
    found: list[tuple[str, bytes, Any, str, str]] = []

    def task(case: str, raw: bytes, error: str, **kw: Any) -> None:
        headers = kw.pop("headers", None) or task_headers("clustering.assign")
        found.append((case, raw, headers, kw.pop("content_type", "application/json"), error))

    task("args nested 900 deep", body([nested(900)]), "levels deep")
    task("args nested 20,000 deep", b"[[" + deep_json(20_000) + b"], {}, {}]", "levels deep")
    task(
        "a header nested 40 deep",
        body([ROW]),
        "headers nested deeper",
        headers=task_headers("clustering.assign", extra=nested(40)),
    )
    task("a body that is not JSON", b"\xff\xfe not json", "not valid JSON")
    task("a body that is an object", b"{}", "[args, kwargs, embed]")
    task("args that are a string", body("rows"), "args must be an array")
    task("too many arguments", body(list(range(100))), "positional arguments")
    task("a 2 MB body", body(["x" * 2_100_000]), "MODELWORKERS_MAX_MESSAGE_BYTES")
    task(
        "a pickled body",
        b"\x80\x04N.",
        "content type",
        content_type="application/x-python-serialize",
    )
    task(
        "a compressed body",
        gzip.compress(body([ROW])),
        "compressed",
        headers=task_headers("clustering.assign", compression="application/x-gzip"),
    )
    task(
        "a time limit that is text",
        body([ROW]),
        "timelimit",
        headers=task_headers("clustering.assign", timelimit="soon"),
    )
    task("a task nobody registered", body([]), "NotRegistered", headers=task_headers("no.such"))
    task("rows with NaN", b'[[[[1.0, NaN, 3.0]]], {"model": "seg"}, {}]', "finite number")
    return found


def stored(client: redis.Redis, task_id: str, timeout: float = 30) -> dict[str, Any]:
    raw = wait_for(lambda: client.get(meta_key(task_id)), timeout, f"the result of {task_id}")
    result: dict[str, Any] = json.loads(raw)
    return result


def test_hostile_messages_over_rabbitmq_end_one_task_each_and_the_node_serves_on(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, rabbitmq_vhost: RabbitVhost
) -> None:
    url = private_redis.url
    broker = Broker("amqp", rabbitmq_vhost)
    client = redis.Redis.from_url(url)
    worker = start_worker(
        redis_url=url,
        broker_url=broker.url(url),
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)),
            "MODELWORKERS_MAX_MESSAGE_BYTES": str(2**20),
        },
    )
    worker.wait_ready(2, timeout=90)
    pid = worker.pid
    app = client_app(url, worker.queue, broker)
    failures = []
    with Connection(broker.url(url)) as conn:
        producer = conn.Producer()
        for case, raw, headers, content_type, error in [
            *cases(),
            # AMQP only: a message with no headers at all (nothing to name, nothing stored)
            ("no headers", body([ROW]), None, "application/json", ""),
        ]:
            producer.publish(
                raw,
                exchange="",
                routing_key=worker.queue,
                headers=headers or {},
                content_type=content_type,
                content_encoding="binary",
                delivery_mode=2,
            )
            try:
                if headers:
                    result = stored(client, headers["id"])
                    assert result["status"] == "FAILURE", result
                    exc = result["result"]
                    message = f"{exc['exc_type']}: " + " ".join(map(str, exc["exc_message"]))
                    assert error in message, (error, message)
                ok = app.send_task("clustering.assign", args=[ROW], kwargs={"model": "seg"}).id
                assert stored(client, ok)["status"] == "SUCCESS"
                assert worker.alive() and worker.pid == pid
                wait_for(lambda: broker.queue_empty(client, worker.queue), 20, "queue empty")
            except (AssertionError, TimeoutError) as exc:
                failures.append(f"{case}: {exc}")
                if not worker.alive():
                    break
    close_app(app)
    assert not failures, "\n".join(failures) + "\n" + worker.log()[-3000:]
    log = worker.log()
    assert "Unrecoverable error" not in log
    # refused by the intake: every case but the unregistered task (Celery's own refusal) and the
    # NaN rows (the task's input check), plus the message with no headers
    assert log.count("refused ") == len(cases()) - 2 + 1
