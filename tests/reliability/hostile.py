"""Publishing as a hostile client does: raw kombu envelopes pushed onto the queue list in Redis,
byte for byte, without Celery's (or kombu's) encoder in the way."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import redis

NO_OPTIONS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_headers(task: str, task_id: str | None = None, **extra: Any) -> dict[str, Any]:
    """The headers Celery 5 puts on a task message (protocol 2)."""
    task_id = task_id or str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(...)",
        "kwargsrepr": "{}",
        "origin": "hostile@test",
        "ignore_result": False,
        **extra,
    }


def body(args: Any, kwargs: Any = None, options: Any = NO_OPTIONS) -> bytes:
    """A protocol-2 body: ``[args, kwargs, options]`` as JSON."""
    return json.dumps([args, {} if kwargs is None else kwargs, options]).encode()


def envelope(
    raw_body: bytes,
    headers: Any,
    queue: str,
    *,
    content_type: str = "application/json",
    properties: Any = None,
) -> bytes:
    """The JSON envelope kombu's Redis transport keeps on the queue list."""
    props = {
        "correlation_id": headers.get("id") if isinstance(headers, dict) else None,
        "reply_to": str(uuid.uuid4()),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps(
        {
            "body": base64.b64encode(raw_body).decode(),
            "content-encoding": "utf-8",
            "content-type": content_type,
            "headers": headers,
            "properties": props if properties is None else properties,
        }
    ).encode()


def push(client: redis.Redis, queue: str, raw: bytes) -> None:
    """Put ``raw`` on the queue as the next message a worker takes."""
    client.lpush(queue, raw)


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep, built without recursion."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth
