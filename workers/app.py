"""The Celery application. Start a worker with ``celery -A workers.app worker``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from celery import Celery

from shared.settings import get_settings


def _prepare_metrics_dir() -> None:
    """Multi-process metrics need their directory set before prometheus_client is imported.
    It is emptied by the worker's main process at start (workers.signals), not here: any
    process that imports the app (CLI, Flower) would otherwise wipe a live worker's files."""
    settings = get_settings()
    if not settings.metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    folder = settings.prometheus_multiproc_dir or (
        Path(tempfile.gettempdir()) / f"modelworkers-metrics-{os.getpid()}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


_prepare_metrics_dir()

app = Celery(
    "modelworkers",
    include=["tasks.sentiment", "tasks.forecasting", "tasks.clustering", "tasks.control"],
)
app.config_from_object("celeryconfig")

# Connect the signal handlers and remote-control commands (import for side effect).
from workers import control, signals  # noqa: E402, F401
from workers.bootsteps import RegistryStats  # noqa: E402

app.steps["worker"].add(RegistryStats)
