"""Worker bootsteps: the registry summary in `stats` (so Flower shows it) and the metrics port."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from shared.settings import get_settings
from shared.state import fleet_summary, read_snapshots
from shared.urls import redact, redis_client

log = logging.getLogger("modelworkers.worker")


def node_registry(node: str) -> dict[str, Any]:
    """This node's pool processes and their models, compact, from the registry in Redis (the
    JSON that Celery's ``stats`` reply carries)."""
    settings = get_settings()
    snaps = [
        s for s in read_snapshots(redis_client(settings), settings.key_prefix) if s.node == node
    ]
    summary = fleet_summary(snaps)
    models = {}
    for name, agg in summary.models.items():
        versions = ", ".join(f"{v} x{n}" for v, n in sorted(agg.versions.items()))
        models[name] = f"READY in {agg.ready_in}/{len(snaps)} ({versions})" + (
            f", FAILED in {agg.failed_in}" if agg.failed_in else ""
        )
    return {
        "ready": summary.ready,
        "processes": len(snaps),
        "models": models,
        "not_ready": [p.model_dump(mode="json") for p in summary.not_ready],
    }


class RegistryStats(bootsteps.StartStopStep):
    """Adds ``model_registry`` to the worker's ``stats`` (Flower's worker page, `inspect stats`)
    and serves the pool processes' Prometheus metrics when METRICS_PORT is set."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: Any = None

    def start(self, worker: Any) -> None:
        port = get_settings().metrics_port
        if port and self.server is None:
            from shared import metrics

            if not metrics.enabled():
                log.warning("METRICS_PORT is set but metrics were not enabled at start")
                return
            self.server = metrics.serve(port)
            log.info("Prometheus metrics of every pool process on :%d/metrics", port)

    def stop(self, worker: Any) -> None:
        if self.server is not None:
            server = self.server[0] if isinstance(self.server, tuple) else self.server
            server.shutdown()
            self.server = None

    def info(self, worker: Any) -> dict[str, Any]:
        info: dict[str, Any] = {}
        batcher = getattr(worker.consumer, "_modelworkers_batcher", None)
        if batcher is not None:  # prefork batching (workers/poolbatch.py)
            info["pool_batching"] = batcher.stats()
        try:
            info["model_registry"] = node_registry(worker.hostname)
        except Exception as exc:
            info["model_registry"] = {"error": redact(str(exc))}
        return info
