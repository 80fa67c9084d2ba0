"""Celery signal handlers. Thin: they call ``workers.process``, which calls the registry."""

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

from shared.settings import get_settings
from workers import process
from workers.logs import configure_logging, drop_early_handler

log = logging.getLogger("modelworkers.worker")
_pool_kind = "prefork"


def pool_kind(worker: Any) -> str:
    """prefork / solo / threads / gevent / eventlet, from the worker's pool class."""
    cls = getattr(worker, "pool_cls", "prefork")
    name = cls if isinstance(cls, str) else f"{cls.__module__}"
    for kind in ("prefork", "solo", "threads", "thread", "gevent", "eventlet", "processes"):
        if kind in name:
            return {"thread": "threads", "processes": "prefork"}.get(kind, kind)
    return "prefork"


@worker_init.connect
def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main process, before the pool starts: imports (and parent-mode loads) happen here."""
    global _pool_kind
    configure_logging(early=True)
    settings = get_settings()
    settings.ensure_dirs()
    process.NODE_NAME = getattr(sender, "hostname", "") or ""
    _pool_kind = pool_kind(sender)
    concurrency = int(getattr(sender, "concurrency", 0) or settings.worker_concurrency)
    process.SERVING_PROCESSES = concurrency if _pool_kind == "prefork" else 1
    process.enable_metrics(settings)
    manifest = process.read_manifest(settings)
    if settings.preimport:
        seconds = process.preimport(manifest)
        log.info(
            "imported model libraries in %.2f s before starting the %s pool", seconds, _pool_kind
        )
    if _pool_kind in ("threads", "gevent", "eventlet"):
        # These pools never send worker_process_init: this process serves, so it loads now.
        process.start_serving(settings)
    elif _pool_kind == "prefork" and process.resolve_preload_mode(settings) == "parent":
        process.load_in_parent(settings)


@after_setup_logger.connect
def on_after_setup_logger(**_: Any) -> None:
    """Celery's handlers are in place: stop using the temporary one from worker_init."""
    drop_early_handler()


@worker_process_init.connect
def on_worker_process_init(**_: Any) -> None:
    """Each prefork child (and the solo pool's main process): load the models, then serve."""
    settings = get_settings()
    inherited = _pool_kind == "prefork" and process.resolve_preload_mode(settings) == "parent"
    process.start_serving(settings, inherited=inherited)


@worker_process_shutdown.connect
def on_worker_process_shutdown(**_: Any) -> None:
    process.stop_serving()


@worker_shutdown.connect
def on_worker_shutdown(**_: Any) -> None:
    if _pool_kind in ("threads", "gevent", "eventlet", "solo"):
        process.stop_serving()
