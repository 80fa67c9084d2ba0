"""Worker bootsteps: the registry summary in `stats` (so Flower shows it, one row per model) and
the metrics port (the pool processes' metrics, and the depth of the queues this node consumes)."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from shared.records import ProcessSnapshot
from shared.settings import get_settings
from shared.state import fleet_summary, read_node_snapshots
from shared.urls import redact, redis_client

log = logging.getLogger("modelworkers.worker")


STATS_KEY = "model_registry"


def node_snapshots(node: str) -> list[ProcessSnapshot]:
    settings = get_settings()
    snaps = read_node_snapshots(redis_client(settings), settings.key_prefix, node)
    return [s for s in snaps if s.node == node]


def model_rows(snaps: list[ProcessSnapshot]) -> dict[str, str]:
    """One readable line per model of a node, for ``stats`` (Flower's worker page shows each
    top-level entry of ``stats`` as a row of its own, and a dict as one string):

        model_registry            READY: 2/2 processes ready, 5 models
        model_registry.sentiment  READY 2/2 v1.0.0 calls 42 errors 0
        model_registry.ghost      FAILED 0/2 v1.0.0 calls 0 errors 0 (FAILED in 2: ArtifactError...)
    """
    summary = fleet_summary(snaps)
    total = len(snaps)
    state = "READY" if summary.ready else "NOT READY"
    rows = {
        STATS_KEY: f"{state}: {summary.ready_processes}/{total} processes ready, "
        f"{len(summary.models)} models"
    }
    for name in sorted(summary.models):
        agg = summary.models[name]
        metas = [s.models[name] for s in snaps if name in s.models]
        statuses = {m.status for m in metas}
        status = statuses.pop() if len(statuses) == 1 else "MIXED"
        versions = sorted(agg.versions) or sorted({m.version for m in metas})
        calls = sum(sum(v.calls for v in m.versions.values()) or m.calls for m in metas)
        errors = sum(sum(v.failures for v in m.versions.values()) or m.failures for m in metas)
        row = (
            f"{status} {agg.ready_in}/{total} "
            + " ".join(f"v{v}" for v in versions)
            + f" calls {calls} errors {errors}"
        )
        if agg.failed_in:
            error = next((m.error for m in metas if m.error), None)
            row += f" (FAILED in {agg.failed_in}" + (f": {error[:200]}" if error else "") + ")"
        if not agg.required:
            row += " optional"
        rows[f"{STATS_KEY}.{name}"] = row
    for problem in summary.not_ready:
        rows[f"{STATS_KEY}.not_ready.{problem.pid}"] = "; ".join(problem.reasons) or "not ready"
    return rows


class RegistryStats(bootsteps.StartStopStep):
    """Adds ``model_registry`` to the worker's ``stats`` (Flower's worker page, `inspect stats`)
    and serves the pool processes' Prometheus metrics when METRICS_PORT is set."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.server: Any = None

    def start(self, worker: Any) -> None:
        settings = get_settings()
        port = settings.metrics_port
        if port and self.server is None:
            from shared import metrics

            if not metrics.enabled():
                log.warning(
                    "MODELWORKERS_METRICS_PORT is set but metrics were not enabled at start"
                )
                return
            self.server = metrics.serve(port, collectors=[queue_collector(worker)])
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
            info.update(model_rows(node_snapshots(worker.hostname)))
        except Exception as exc:
            info[STATS_KEY] = f"cannot read the registry: {redact(str(exc))}"
        return info


def queue_collector(worker: Any) -> Any:
    """The depth of the queues this node consumes, read from the broker (Redis or RabbitMQ) on
    each scrape with a short timeout (a scrape never waits long on it, nor fails because of
    it)."""
    from shared.metrics import QueueCollector
    from workers.broker import queue_reader

    settings = get_settings()
    try:
        queues = set(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
    except AttributeError:
        queues = {settings.task_queue}
    options = worker.app.conf.broker_transport_options or {}
    return QueueCollector(
        None,
        queues or {settings.task_queue},
        settings.key_prefix,
        read=queue_reader(settings, timeout=1, transport_options=options),
    )
