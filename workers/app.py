"""The Celery application. Start a worker with ``celery -A workers.app worker``."""

from __future__ import annotations

from celery import Celery

app = Celery(
    "modelworkers",
    include=["tasks.sentiment", "tasks.forecasting", "tasks.clustering", "tasks.control"],
)
app.config_from_object("celeryconfig")

# Connect the signal handlers and remote-control commands (import for side effect).
from workers import control, signals  # noqa: E402, F401
