"""Fuzzing a real worker with hostile messages (Hypothesis), published raw onto its queue.

Each generated message is pushed byte for byte onto the queue list, the way a client that does not
go through Celery's encoder would: random bytes, envelopes with missing or mistyped fields,
headers of any type, bodies of any shape, arguments nested thousands deep, huge and non-finite
numbers, unicode, long strings. After each one a normal task (also raw) must succeed, and the
node's main process must be the same process, alive. A few hundred cases per run, spread over the
prefork, threads and solo pools.

The seed is printed (and is in the failure message); replay a run with FUZZ_SEED=<seed>.
Shrinking is off: a failure is reported as generated, at once, instead of being minimised against
a node that may no longer answer.
"""

from __future__ import annotations

import base64
import json
import os
import random
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from harness import WorkerProcess, wait_for
from tests.reliability.hostile import NO_OPTIONS, body, envelope, push, task_headers
from tests.reliability.tools import meta_key, seg_manifest
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

SEED = int(os.environ.get("FUZZ_SEED") or random.SystemRandom().randrange(2**32))
EXAMPLES = {"prefork": 160, "threads": 70, "solo": 70}
TASKS = [
    "clustering.assign",
    "clustering.fit",
    "sentiment.analyze",
    "sentiment.analyze_batch",
    "forecast.predict",
    "forecast.arima",
    "control.publish_state",
    "no.such.task",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=25,
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# Hostile values as JSON text: deep nesting is written as brackets, never built and encoded
# recursively (the client must not be the one that overflows its stack).
fragments = st.one_of(
    json_values.map(dumps),
    st.integers(2, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(2, 3000).map(lambda n: b'{"a": ' * n + b"1" + b"}" * n),
    st.integers(1, 400_000).map(lambda n: dumps("\u00e9\U0001f600x"[n % 3] * n)),
    st.integers(1, 6000).map(lambda n: b"9" * n),  # past Python's int-from-text digit limit
    st.sampled_from([b"1e999999", b"NaN", b"-Infinity", b'"\\udc80 lone surrogate"']),
    st.lists(st.lists(st.floats(), min_size=1, max_size=5), max_size=50).map(dumps),
)


def array(items: list[bytes]) -> bytes:
    return b"[" + b", ".join(items) + b"]"


def obj(items: dict[str, bytes]) -> bytes:
    return b"{" + b", ".join(dumps(k) + b": " + v for k, v in items.items()) + b"}"


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Task bodies: valid, of the wrong shape, or not JSON at all."""
    kind = draw(st.sampled_from(["args", "args", "shape", "bytes"]))
    if kind == "args":
        args = draw(st.lists(fragments, max_size=4))
        kwargs = draw(st.dictionaries(st.sampled_from(["model", "n_clusters", "x"]), fragments))
        options = draw(st.one_of(st.just(dumps(NO_OPTIONS)), fragments))
        return array([array(args), obj(kwargs), options])
    if kind == "shape":
        return draw(fragments)
    return draw(st.binary(max_size=300))


@st.composite
def header_text(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(fragments)  # headers that are not an object
    base = {k: dumps(v) for k, v in task_headers(draw(st.sampled_from(TASKS))).items()}
    if draw(st.booleans()):
        return obj(base)  # headers as Celery writes them: the arguments decide
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
        if draw(st.booleans()):
            base.pop(key, None)
        else:
            base[key] = draw(fragments)
    return obj(base)


@st.composite
def messages(draw: st.DrawFn, queue: str) -> bytes:
    """One raw queue item: a hostile envelope, or a hostile message in a valid envelope."""
    kind = draw(st.sampled_from(["task", "task", "task", "envelope", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    fields = ["body", "headers", "properties", "content-type", "content-encoding"]
    if kind == "envelope":
        return obj(draw(st.dictionaries(st.sampled_from(fields), fragments)))
    content_type = draw(
        st.sampled_from(["application/json"] * 6 + ["application/x-python-serialize", "text/x"])
    )
    valid = json.loads(envelope(b"", {}, queue, content_type=content_type))
    valid["body"] = base64.b64encode(draw(raw_bodies())).decode()
    parts = {k: dumps(v) for k, v in valid.items() if k != "headers"}
    parts["headers"] = draw(header_text())
    return obj(parts)


def normal_task(client: redis.Redis, queue: str) -> str:
    task_id = str(uuid.uuid4())
    raw_body = body([[[0.5, 1.5, 2.5]]], {"model": "seg"})
    push(client, queue, envelope(raw_body, task_headers("clustering.assign", task_id), queue))
    return task_id


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_no_generated_message_stops_the_node_and_each_is_followed_by_a_served_task(
    start_worker: Start, private_redis: EmbeddedRedis, tmp_path: Path, pool: str
) -> None:
    print(f"fuzz seed {SEED} (replay with FUZZ_SEED={SEED})")
    client = redis.Redis.from_url(private_redis.url)
    worker = start_worker(
        redis_url=private_redis.url,
        pool=pool,
        concurrency={"prefork": 2, "threads": 4, "solo": 1}[pool],
        env={
            "MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)),
            "MODELWORKERS_MAX_MESSAGE_BYTES": str(2**20),
        },
    )
    worker.wait_ready(2 if pool == "prefork" else 1, timeout=90)
    pid = worker.pid
    queue = worker.queue
    cases = 0

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES[pool],
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(raw=messages(queue))
    def one_message_then_a_normal_task(raw: bytes) -> None:
        nonlocal cases
        cases += 1
        push(client, queue, raw)
        task_id = normal_task(client, queue)
        where = f"(seed {SEED}, pool {pool}, case {cases})"

        def answered() -> dict[str, Any] | None:
            if not worker.alive():
                raise AssertionError(f"the node died {where}:\n{worker.log()[-3000:]}")
            stored = client.get(meta_key(task_id))
            return json.loads(stored) if stored else None

        result = wait_for(answered, 60, f"the normal task after the message {where}", 0.005)
        assert result["status"] == "SUCCESS", (where, result)
        assert worker.pid == pid and worker.alive(), where

    one_message_then_a_normal_task()
    log = worker.log()
    assert cases == EXAMPLES[pool]
    assert "Unrecoverable error" not in log, log[-3000:]
    assert "Restoring" not in log
