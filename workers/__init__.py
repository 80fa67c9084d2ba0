"""The Celery side of modelworkers: app, signal handlers, remote control, CLI.

``celery -A workers worker`` finds the app here (``workers.app``, also as ``workers.celery``, the
two names Celery looks for). It is imported on first access, so importing ``workers.cli`` or
``workers.embedded`` does not build the Celery app.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app", "celery"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from workers.app import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
