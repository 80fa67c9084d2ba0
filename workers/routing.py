"""Routing: a task that serves a model goes to that model's queue.

A model file may name a ``queue`` (e.g. ``gpu``); nodes started with ``-Q gpu`` load and serve
those models, the others the rest. ``route_task`` is Celery's router for every client that uses
this project's Celery configuration (``task_routes`` in celeryconfig.py): it reads the model's
queue from the model repository. A client without the repository uses
``workers.client.ModelClient``, which learns each model's queue from the live snapshots in
Redis; a client in another language sends to the queue itself.
"""

from __future__ import annotations

import time
from typing import Any

from shared.settings import get_settings

REFRESH_SECONDS = 30.0  # how long a read of the repository's queues is used
_queues: dict[str, str] = {}
_read_at = 0.0


def model_of_task(name: str, args: Any, kwargs: Any) -> str | None:
    """The model a task message is for, from the task's name and arguments (None: no model)."""
    args = list(args or ())
    kwargs = dict(kwargs or {})
    if name.startswith("sentiment."):
        return "sentiment"
    if name in ("models.predict", "forecast.predict"):
        model = kwargs.get("model", args[0] if args else None)
    elif name == "clustering.assign":
        model = kwargs.get("model", args[1] if len(args) > 1 else "customer_segments")
    else:
        return None
    return model if isinstance(model, str) else None


def model_queues() -> dict[str, str]:
    """Model name -> queue, for the models of the repository that name one (refreshed)."""
    global _queues, _read_at
    if time.monotonic() - _read_at > REFRESH_SECONDS:
        from shared.manifest import manifest_from_settings

        try:
            manifest = manifest_from_settings(get_settings())
            _queues = {s.name: s.queue for s in manifest.active() if s.queue}
        except Exception:  # no repository here (a plain client): the default queue
            _queues = {}
        _read_at = time.monotonic()
    return _queues


def route_task(
    name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **_: Any
) -> dict[str, str] | None:
    """Celery router: the model's queue when its model file names one; else None, and Celery
    sends it to the app's default queue (TASK_QUEUE)."""
    model = model_of_task(name, args, kwargs)
    queue = model_queues().get(model, "") if model else ""
    return {"queue": queue} if queue else None
