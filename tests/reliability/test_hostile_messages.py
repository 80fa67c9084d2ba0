"""Hostile and malformed messages, published raw: each ends its one task, never a node.

Every message here is pushed byte for byte onto the queue list, as a client that does not use
Celery (or means harm) would. After each, the node must be the same process, serve a normal task,
hold nothing back in the queue or the unacked index, and, where the message named a usable task
id, have stored a FAILURE that says what was wrong.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from harness import WorkerProcess, close_app, wait_for
from tests.reliability.hostile import body, deep_json, envelope, nested, push, task_headers
from tests.reliability.tools import client_app, meta_key, seg_manifest
from tests.workers.test_flower_metrics import metric
from workers.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
ROW = [[1.0, 2.0, 3.0]]


def stored(client: redis.Redis, task_id: str, timeout: float = 20) -> dict[str, Any]:
    raw = wait_for(lambda: client.get(meta_key(task_id)), timeout, f"the result of {task_id}")
    result: dict[str, Any] = json.loads(raw)
    return result


def queue_empty(client: redis.Redis, queue: str) -> bool:
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


def assert_serves(worker: WorkerProcess, url: str) -> None:
    """The same main process, alive, answers a normal task."""
    app = client_app(url, worker.queue)
    try:
        task_id = app.send_task("clustering.assign", args=[ROW], kwargs={"model": "seg"}).id
    finally:
        close_app(app)
    result = stored(redis.Redis.from_url(url), task_id, 30)
    assert result["status"] == "SUCCESS", result
    assert worker.alive()


def test_a_900_deep_message_sent_once_to_a_fleet_of_two_stops_neither_node(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    manifest = seg_manifest(tmp_path)
    prefix = f"mwtest-{uuid.uuid4().hex[:8]}"
    nodes = [
        start_worker(
            redis_url=url,
            prefix=prefix,
            node=f"{prefix}-{i}@testhost",
            concurrency=1,
            env={"MODELWORKERS_MODEL_MANIFEST": str(manifest)},
        )
        for i in (1, 2)
    ]
    for node in nodes:
        node.wait_ready(1, timeout=90)
    pids = [node.pid for node in nodes]

    headers = task_headers("sentiment.analyze_batch")
    push(client, prefix, envelope(b"[[" + deep_json(900) + b"], {}, {}]", headers, prefix))

    result = stored(client, headers["id"])
    assert result["status"] == "FAILURE"
    assert result["result"]["exc_type"] == "InvalidMessage"
    assert "nested 901 levels deep" in result["result"]["exc_message"][0]
    wait_for(lambda: queue_empty(client, prefix), 10, "queue and unacked index empty")
    # refused once, by one node: never restored for the other to take
    logs = "".join(node.log() for node in nodes)
    assert logs.count(f"refused sentiment.analyze_batch[{headers['id']}]") == 1
    assert "Unrecoverable error" not in logs and "Restoring" not in logs

    # both nodes are the processes they were, and both answer tasks
    assert [node.pid for node in nodes] == pids and all(node.alive() for node in nodes)
    app = client_app(url, prefix)

    def both_answered() -> bool:
        ids = [app.send_task("clustering.assign", args=[ROW], kwargs={"model": "seg"}).id]
        for task_id in ids:
            stored(client, task_id)
        return all(
            "Task clustering.assign" in node.log().split(headers["id"])[-1] for node in nodes
        )

    try:
        wait_for(both_answered, 60, "a task answered by each node after the message", 0.0)
    finally:
        close_app(app)


def _cases(queue: str) -> list[tuple[str, bytes, str | None, str | None]]:
    """(case, raw envelope, task id whose FAILURE is expected or None, text the error holds)."""
    cases: list[tuple[str, bytes, str | None, str | None]] = []

    def add(case: str, raw: bytes, headers: Any, error: str | None) -> None:
        task_id = headers.get("id") if isinstance(headers, dict) and error else None
        cases.append((case, raw, task_id, error))

    def task(case: str, raw_body: bytes, error: str | None, **kw: Any) -> None:
        headers = kw.pop("headers", None) or task_headers("clustering.assign")
        add(case, envelope(raw_body, headers, queue, **kw), headers, error)

    task("args nested 900 deep", body([nested(900)]), "levels deep")
    task("args nested 20,000 deep", b"[[" + deep_json(20_000) + b"], {}, {}]", "levels deep")
    task(
        "a header nested 900 deep",
        body([ROW]),
        "headers nested deeper",
        headers=task_headers("clustering.assign", extra=nested(900)),
    )
    task("a body that is not JSON", b"\xff\xfe not json", "not valid JSON")
    task("a body that is an object", b"{}", "[args, kwargs, embed]")
    task("args that are a string", body("rows"), "args must be an array")
    task("too many arguments", body(list(range(100))), "positional arguments")
    task("a 5,000-digit number", b"[[" + b"9" * 5000 + b"], {}, {}]", "not valid JSON")
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
    task(
        "an ETA that is not a date",
        body([ROW]),
        "ETA",
        headers=task_headers("clustering.assign", eta="next tuesday"),
    )
    task(
        "an id that is not a string",
        body([ROW]),
        None,
        headers=task_headers("clustering.assign", id=["not", "a", "string"]),
    )
    task("a task nobody registered", body([]), "NotRegistered", headers=task_headers("no.such"))
    task("rows with NaN", b'[[[[1.0, NaN, 3.0]]], {"model": "seg"}, {}]', "finite number")
    headers = task_headers("clustering.assign")
    add(
        "no properties",
        json.dumps({"body": "", "headers": headers}).encode(),
        headers,
        "properties",
    )
    add("an envelope that is not JSON", b"<xml/>", {}, None)
    add("an envelope that is an array", b"[1, 2, 3]", {}, None)
    add("an envelope nested 20,000 deep", deep_json(20_000), {}, None)
    return cases


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_every_class_of_hostile_message_ends_one_task_and_the_node_serves_on(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, pool: str
) -> None:
    url = private_redis.url
    client = redis.Redis.from_url(url)
    port = free_port()
    worker = start_worker(
        redis_url=url,
        pool=pool,
        concurrency=2 if pool != "solo" else 1,
        env={
            "MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)),
            "MODELWORKERS_MAX_MESSAGE_BYTES": str(2**20),
            "MODELWORKERS_METRICS_PORT": str(port),
        },
    )
    worker.wait_ready(2 if pool == "prefork" else 1, timeout=90)
    pid = worker.pid
    failures = []
    for case, raw, task_id, error in _cases(worker.queue):
        push(client, worker.queue, raw)
        try:
            if task_id is not None:
                result = stored(client, task_id)
                assert result["status"] == "FAILURE", result
                error_of = result["result"]
                message = f"{error_of['exc_type']}: " + " ".join(map(str, error_of["exc_message"]))
                assert error is not None and error in message, (error, message)
            assert_serves(worker, url)
            assert worker.pid == pid
            wait_for(lambda: queue_empty(client, worker.queue), 10, "queue empty")
        except (AssertionError, TimeoutError) as exc:
            failures.append(f"{case}: {exc}")
            if not worker.alive():
                break
    assert not failures, "\n".join(failures) + "\n" + worker.log()[-3000:]
    log = worker.log()
    assert "Unrecoverable error" not in log and "Restoring" not in log
    # every refusal of the worker's main process is counted, by reason
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    refused = metric(text, "modelworkers_messages_refused_total")
    assert refused >= log.count("refused "), (refused, text[-2000:])
    assert refused >= 1
