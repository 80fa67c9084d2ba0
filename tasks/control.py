"""control.publish_state: a process publishes its registry snapshot to Redis on request."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared.settings import get_settings
from shared.state import publish_snapshot
from shared.urls import redis_client
from tasks.base import ModelTask


@shared_task(name="control.publish_state", base=ModelTask, bind=True)
def publish_state(self: ModelTask) -> dict[str, Any]:
    """Publish this process's registry and health to Redis and return them (as JSON)."""
    settings = get_settings()
    snap = self.registry.snapshot()
    publish_snapshot(redis_client(settings), settings.key_prefix, snap, settings.state_ttl_seconds)
    return snap.model_dump(mode="json")
