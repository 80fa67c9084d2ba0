"""Celery signal handlers. Thin: they create and drive this node's ``ServingProcess``."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    after_setup_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from shared.errors import TracingUnavailable
from shared.settings import get_settings
from workers import serving, tracing
from workers.logs import configure_logging, drop_early_handler
from workers.serving import ServingProcess

log = logging.getLogger("modelworkers.worker")


def pool_kind(worker: Any) -> str:
    """prefork / solo / threads (or another pool's name), from the worker's pool class."""
    cls = getattr(worker, "pool_cls", "prefork")
    name = cls if isinstance(cls, str) else f"{cls.__module__}"
    for kind in ("prefork", "solo", "threads", "thread", "processes", "gevent", "eventlet"):
        if kind in name:
            return {"thread": "threads", "processes": "prefork"}.get(kind, kind)
    return "prefork"


def consumed_queues(worker: Any) -> set[str] | None:
    """The queues this worker consumes (``-Q``, else the app's default queues)."""
    try:
        queues = worker.app.amqp.queues
        return set(queues.consume_from or queues)
    except AttributeError:  # not a WorkController (a test's stand-in): every model
        return None


@worker_init.connect
def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: imports (and parent-mode loads) happen here."""
    configure_logging(early=True)
    settings = get_settings()
    try:
        traced = tracing.configure(settings)
    except TracingUnavailable as exc:  # Celery would log a handler's error and start anyway
        log.critical("the worker does not start: %s", exc)
        raise SystemExit(1) from exc
    pool = pool_kind(sender)
    concurrency = int(getattr(sender, "concurrency", 0) or settings.worker_concurrency)
    node = getattr(sender, "hostname", "") or ""
    process = serving.install(
        ServingProcess(
            settings,
            node=node,
            pool=pool,
            concurrency=concurrency,
            queues=consumed_queues(sender),
            tracing=traced,
        )
    )
    process.prepare()


@after_setup_logger.connect
def on_after_setup_logger(**_: Any) -> None:
    """Celery's handlers are in place: stop using the temporary one from worker_init."""
    drop_early_handler()


@worker_process_init.connect
def on_worker_process_init(**_: Any) -> None:
    """Each prefork child (and the solo pool's main process): load the models, then serve."""
    process = serving.current()
    if process is not None:
        process.start()


@worker_process_shutdown.connect
def on_worker_process_shutdown(**_: Any) -> None:
    process = serving.current()
    if process is not None:
        process.stop()


@worker_shutdown.connect
def on_worker_shutdown(**_: Any) -> None:
    process = serving.current()
    if process is not None and process.pool in ("threads", "solo"):
        process.stop()
