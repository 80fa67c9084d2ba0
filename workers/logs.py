"""Logging: every line carries the process id; model events are one line each."""

from __future__ import annotations

import logging
import os
from typing import Any

from shared.records import ProcessSnapshot
from shared.registry import ModelMetadata, ModelState

log = logging.getLogger("modelworkers")


_early: logging.Handler | None = None


def configure_logging(level: int = logging.INFO, *, early: bool = False) -> None:
    """Let modelworkers' INFO lines through.

    ``early``: Celery sends ``worker_init`` before it sets up logging, so the imports and
    parent-side loads done there would log into the void; a temporary stderr handler carries
    them until ``drop_early_handler`` runs (on Celery's ``after_setup_logger``).
    """
    global _early
    root = logging.getLogger("modelworkers")
    if early and _early is None and not logging.getLogger().handlers:
        _early = logging.StreamHandler()
        _early.setFormatter(
            logging.Formatter("[%(asctime)s: %(levelname)s/MainProcess] %(message)s")
        )
        root.addHandler(_early)
    root.setLevel(level)


def drop_early_handler() -> None:
    global _early
    if _early is not None:
        logging.getLogger("modelworkers").removeHandler(_early)
        _early = None


def runs_on(device: str, details: dict[str, Any]) -> str:
    """``cpu``, or ``cpu/onnx`` where the family names the runtime it chose (``backend``)."""
    backend = details.get("backend")
    return f"{device}/{backend}" if backend else device


def log_model_event(meta: ModelMetadata) -> None:
    """Registry listener: one line per model state change."""
    pid = os.getpid()
    name = f"{meta.name}@{meta.version}"
    if meta.status is ModelState.LOADING:
        log.info("model %s (%s) LOADING [pid %d]", name, meta.family, pid)
    elif meta.status is ModelState.READY:
        log.info(
            "model %s READY in %.2f s on %s (%+.1f MB) [pid %d]",
            name,
            meta.load_seconds or 0.0,
            runs_on(meta.device, meta.details),
            meta.memory_delta_mb or 0.0,
            pid,
        )
        if meta.reload_error:
            log.warning("model %s reload failed, old version serving: %s", name, meta.reload_error)
    elif meta.status is ModelState.FAILED:
        fb = f"; fallback {meta.fallback} answers" if meta.fallback else ""
        level = logging.ERROR if meta.required else logging.WARNING
        log.log(level, "model %s FAILED: %s%s [pid %d]", name, meta.error, fb, pid)
    elif meta.status is ModelState.UNLOADED:
        log.info("model %s unloaded [pid %d]", name, pid)


def summary_table(snapshot: ProcessSnapshot) -> str:
    """The registry as a fixed-width table (the worker logs it once all loads are done)."""
    rows = [("model", "family", "version", "status", "load s", "device", "note")]
    for name, m in snapshot.models.items():
        note = m.error or ("lazy" if m.lazy and m.status == "UNLOADED" else "")
        load = f"{m.load_seconds:.2f}" if m.load_seconds is not None else "-"
        rows.append(
            (name, m.family, m.version, m.status, load, runs_on(m.device, m.details), note[:60])
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    state = "READY" if snapshot.ready else "NOT READY: " + "; ".join(snapshot.not_ready_reasons)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([f"registry of pid {snapshot.pid}: {state}", *lines])
