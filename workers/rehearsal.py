"""Rehearsal: each serving process runs its model tasks once on canned inputs before READY.

A model's own warm-up (``Model.warmup``) makes its first prediction warm; the first *task* would
still pay for everything around the model that a process has never run: Celery's tracer, input
validation, the task body, the result dict. In a pool process forked from a parent that loaded the
models (copy-on-write mode) that first run also copies every shared memory page it writes to
(reference counts), one page fault at a time. The rehearsal pays for all of this before the
process says READY, through the same code as a real task (``Task.apply``: Celery's tracer, eager),
with three differences: nothing is stored in the result backend, no event is sent, and the calls
are not counted as served (``ModelRegistry.uncounted``).

Only models already READY are rehearsed (a lazy model stays unloaded), on the smallest inputs;
forecast.prophet (a Stan fit per request) is left out: the Prophet warm-up fits once already.
It runs where the models are served, after fork: in the parent it would copy nothing less
(measured: the same total PSS) and torch must not compute there. A failed rehearsal is logged
and never keeps a process from serving.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

from shared.families.arima_forecaster import ArimaForecaster
from shared.families.prophet_forecaster import ProphetForecaster
from shared.families.sklearn_pipeline import SklearnPipeline
from shared.registry import ModelRegistry, ModelState

log = logging.getLogger("modelworkers.worker")

SENTIMENT_MODEL = "sentiment"  # the model the sentiment tasks serve (tasks.sentiment.MODEL)
ROUNDS = 2  # the first run pays the one-time costs; the second runs on what the first built
Job = tuple[str, tuple[Any, ...], dict[str, Any]]


def _series(points: int = 24) -> dict[str, list[Any]]:
    """A small monthly series with trend and season (deterministic)."""
    y = [round(100 + 2 * i + 10 * math.sin(i * math.pi / 6), 3) for i in range(points)]
    ds = [f"{2000 + i // 12}-{i % 12 + 1:02d}-01" for i in range(points)]
    return {"ds": ds, "y": y}


def rehearsal_jobs(registry: ModelRegistry) -> list[Job]:
    """(task name, args, kwargs): each READY model's serving task; and for the libraries these
    models come from, the small fits that requests make with them (forecast.arima,
    clustering.fit; Prophet's own warm-up already fits once)."""
    jobs: list[Job] = []
    fits: dict[str, Job] = {}
    for name in registry.names():
        if registry.metadata(name).status is not ModelState.READY:
            continue  # loading, failed, or lazy and not yet used: never load for a rehearsal
        model = registry.get(name)
        if name == SENTIMENT_MODEL:
            jobs.append(("sentiment.analyze", ("warm up",), {}))
            jobs.append(("sentiment.analyze_batch", (["warm up", "a second text"],), {}))
        elif isinstance(model, SklearnPipeline):
            if model.n_features:
                jobs.append(("clustering.assign", ([[0.0] * model.n_features],), {"model": name}))
            rows = [[float(i % 3), float(i // 3)] for i in range(6)]
            fits["clustering.fit"] = ("clustering.fit", (rows, 2), {})
        elif isinstance(model, ProphetForecaster | ArimaForecaster):
            jobs.append(("forecast.predict", (name, 1), {}))
            if isinstance(model, ArimaForecaster):
                fits["forecast.arima"] = ("forecast.arima", (_series(), 2), {"order": [1, 1, 1]})
    return jobs + [fits[name] for name in sorted(fits)]


def rehearse(registry: ModelRegistry, *, rounds: int = ROUNDS) -> tuple[int, int]:
    """Run the rehearsal jobs ``rounds`` times; returns (jobs, failed jobs)."""
    from celery import current_app

    jobs = rehearsal_jobs(registry)
    if not jobs:
        return 0, 0
    trace_log = logging.getLogger("celery.app.trace")  # its "Task ... succeeded" lines
    level = trace_log.level
    trace_log.setLevel(logging.WARNING)
    failed: set[str] = set()
    t0 = time.perf_counter()
    try:
        with registry.uncounted():
            for _ in range(rounds):
                for task_name, args, kwargs in jobs:
                    if task_name in failed:
                        continue
                    try:
                        result = current_app.tasks[task_name].apply(
                            args, kwargs, task_id=f"rehearsal-{uuid.uuid4()}"
                        )
                        error = result.result if result.failed() else None
                    except Exception as exc:  # e.g. the task is not registered
                        error = exc
                    if error is not None:
                        failed.add(task_name)
                        log.warning("rehearsal of %s failed: %r", task_name, error)
    finally:
        trace_log.setLevel(level)
    log.info(
        "rehearsed %d task(s) x %d in %.0f ms: %s",
        len(jobs),
        rounds,
        (time.perf_counter() - t0) * 1000,
        ", ".join(sorted({j[0] for j in jobs})),
    )
    return len(jobs), len(failed)
