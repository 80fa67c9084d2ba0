"""The product's Celery app with per-task settings switched by the environment (``1`` on, ``0``
off, unset: the product's) for the ablation; ``bench.noop``: Celery and Redis alone, no model;
``bench.timed_sentiment``: ``sentiment.analyze`` that also returns how long its body ran."""

from __future__ import annotations

import os
import time
from typing import Any

from tasks.base import ModelTask
from tasks.sentiment import analyze
from workers.app import app

for _env, _key in (
    ("BENCH_TRACK_STARTED", "task_track_started"),
    ("BENCH_TASK_EVENTS", "worker_send_task_events"),
    ("BENCH_RESULT_EXTENDED", "result_extended"),
):
    if os.environ.get(_env) in ("0", "1"):
        app.conf[_key] = os.environ[_env] == "1"


@app.task(name="bench.noop")
def noop(value: Any) -> Any:
    return value


@app.task(name="bench.timed_sentiment", base=ModelTask, bind=True)
def timed_sentiment(self: ModelTask, text: Any) -> dict[str, Any]:
    """``sentiment.analyze``'s body, timed inside the pool process: the rest of the round trip
    is Celery, Redis and the client around it."""
    t0 = time.perf_counter()
    out = analyze.run(text)
    return {**out, "body_ms": (time.perf_counter() - t0) * 1000}
