"""Remote-control commands. They run in each worker's MAIN process, which holds no models, so
they act through Redis: ``registry`` reads the pool processes' snapshots, ``reload_models``
publishes a reload that this node's pool processes carry out (see shared/reload.py).

    celery -A workers.app inspect registry
    celery -A workers.app control reload_models sentiment 1.1.0 -d worker@host
    app.control.broadcast("reload_models", arguments={"model": "sentiment"}, reply=True)
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import control_command, inspect_command

from shared.errors import ModelWorkersError
from shared.manifest import manifest_from_settings
from shared.reload import send_reload
from shared.settings import get_settings
from shared.state import read_node_snapshots
from shared.urls import redact, redis_client


@inspect_command()
def registry(state: Any) -> dict[str, Any]:
    """Registry snapshots of this node's pool processes (from Redis)."""
    node = state.consumer.hostname
    settings = get_settings()
    try:
        snaps = read_node_snapshots(redis_client(settings), settings.key_prefix, node)
    except Exception as exc:
        return {"error": f"cannot read the registry from Redis: {redact(str(exc))}"}
    return {"ok": [s.model_dump(mode="json") for s in snaps if s.node == node]}


@control_command(
    args=[("model", str), ("version", str)],
    signature="[MODEL] [VERSION]",
)
def reload_models(
    state: Any, model: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """Reload one model (or all) in every pool process of this node; answers with a request id
    whose per-process results appear in Redis (`modelworkers reload` waits for them)."""
    node = state.consumer.hostname
    settings = get_settings()
    try:
        manifest = manifest_from_settings(settings)
        request = send_reload(
            redis_client(settings),
            settings.key_prefix,
            manifest,
            models=[model] if model else None,
            version=version or None,
            nodes=[node],
        )
    except ModelWorkersError as exc:
        return {"error": str(exc)}
    except Exception as exc:
        return {"error": f"reload could not be sent: {redact(str(exc))}"}
    return {
        "ok": {
            "request_id": request.id,
            "models": request.models,
            "processes": len(request.expected),
        }
    }
