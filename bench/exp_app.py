"""The product's Celery app with some of its per-task settings switched by the environment at
import (``1`` on, ``0`` off, unset: the product's): ``BENCH_TRACK_STARTED``
(``task_track_started``), ``BENCH_TASK_EVENTS`` (``worker_send_task_events``, on while Flower
watches), ``BENCH_RESULT_EXTENDED`` (``result_extended``); what each costs a task's round trip
(the overhead section's ablation, ``celery -A bench.exp_app worker``). Its ``bench.noop`` returns
its argument: the round trip of Celery and Redis alone, the floor under any task's latency.
"""

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
    """No model, no validation: what Celery + Redis cost per task on this machine."""
    return value


__all__ = ["app", "noop"]
