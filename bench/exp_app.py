"""The product's Celery app with per-task settings switched by the environment (``1`` on, ``0``
off, unset: the product's) for the ablation; ``bench.noop``: Celery and Redis alone, no model."""

from __future__ import annotations

import os
from typing import Any

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
