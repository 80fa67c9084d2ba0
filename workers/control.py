"""Remote-control commands. They run in each worker's MAIN process, which holds no models:
they answer from (or act through) the per-process registry state in Redis."""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from shared.settings import get_settings
from shared.state import read_snapshots
from shared.urls import redis_client


@inspect_command()
def registry(state: Any) -> dict[str, Any]:
    """Registry snapshots of this node's pool processes (from Redis)."""
    node = state.consumer.hostname
    settings = get_settings()
    try:
        snaps = read_snapshots(redis_client(settings), settings.key_prefix)
    except Exception as exc:
        return {"error": f"cannot read the registry from Redis: {exc}"}
    return {"ok": [s for s in snaps if s.get("node") == node]}
