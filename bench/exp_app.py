"""The product's Celery app with some of its settings switched off, for the overhead section's
ablation only (``celery -A bench.exp_app worker``): how much of a task's round trip each
setting of ``celeryconfig.py`` costs. Read from the environment at import:

* ``BENCH_TRACK_STARTED=0``: ``task_track_started = False`` (no STARTED state write per task)
* ``BENCH_TASK_EVENTS=0``: ``worker_send_task_events = False`` (no task-* events)
* ``BENCH_RESULT_EXTENDED=0``: ``result_extended = False`` (smaller result meta)
"""

from __future__ import annotations

import os

from workers.app import app

if os.environ.get("BENCH_TRACK_STARTED") == "0":
    app.conf.task_track_started = False
if os.environ.get("BENCH_TASK_EVENTS") == "0":
    app.conf.worker_send_task_events = False
if os.environ.get("BENCH_RESULT_EXTENDED") == "0":
    app.conf.result_extended = False

__all__ = ["app"]
