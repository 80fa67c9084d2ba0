"""Rehearsal: each serving process runs its model tasks twice on canned inputs before READY.

A model's own warm-up (``Model.warmup``) makes its first prediction warm; the first *task* would
still pay for everything around the model that a process has never run: Celery's tracer, input
validation, the task body, the result dict. In a pool process forked from a parent that loaded the
models (copy-on-write mode) that first run also copies every shared memory page it writes to
(reference counts), one page fault at a time. The rehearsal pays for all of this before the
process says READY, through the same code as a real task (``Task.apply``: Celery's tracer, eager),
with three differences: nothing is stored in the result backend, no event is sent, and the calls
are not counted as served (``ModelRegistry.uncounted``).

Only models already READY are rehearsed (a lazy model stays unloaded), on the smallest inputs,
with the tasks that serve them. The tasks that fit a new model per request (forecast.prophet,
forecast.arima, clustering.fit) are rehearsed too, on small series and rows
(``REHEARSE_FIT_TASKS``, default on): their first call otherwise pays for the libraries' lazy
imports and thread-pool set-up (docs/benchmarks.md has the cost in memory per process). It runs
where the models are served, after fork: rehearsing in the copy-on-write parent only moved the
pages it touched (docs/benchmarks.md), and torch must not compute there. A failed rehearsal is
logged and never keeps a process from serving.

"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from shared.families.arima_forecaster import ArimaForecaster
from shared.families.prophet_forecaster import ProphetForecaster
from shared.families.sklearn_pipeline import SklearnPipeline
from shared.registry import ModelRegistry, ModelState
from tasks.sentiment import MODEL as SENTIMENT_MODEL  # the model the sentiment tasks serve

log = logging.getLogger("modelworkers.worker")

ROUNDS = 2  # the first run pays the one-time costs; the second runs on what the first built
Job = tuple[str, tuple[Any, ...], dict[str, Any]]


def fit_jobs() -> list[Job]:
    """The fit-on-request tasks on small inputs (shapes a real request has: a daily series with
    dates, a yearly one, rows of a few features)."""
    days = 40
    daily = {
        "ds": [f"2024-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in range(days)],
        "y": [
            10 + 0.05 * i + (2.0 if i % 7 in (5, 6) else 0.0) + (i % 3) * 0.1 for i in range(days)
        ],
    }
    yearly = {"y": [900 + 150 * ((i * 37) % 11) / 11 + (i % 7) * 5 for i in range(days)]}
    rows = [[(i * 7) % 10 / 10, (i * 3) % 10 / 10, (i % 4) / 4] for i in range(60)]
    return [
        ("forecast.prophet", (daily, 3), {"frequency": "D"}),
        ("forecast.arima", (yearly, 3), {"order": [1, 1, 1]}),
        ("clustering.fit", (rows, 3), {}),
    ]


def rehearsal_jobs(registry: ModelRegistry, *, fits: bool = False) -> list[Job]:
    """(task name, args, kwargs): the tasks that serve each READY model, on tiny inputs: the
    built-in shortcuts of the built-in families, and ``models.predict`` on the example inputs
    of every model whose family gives one (``Model.example``); with ``fits``, the
    fit-on-request tasks too."""

    jobs: list[Job] = fit_jobs() if fits else []
    for name in registry.names():
        if registry.metadata(name).status is not ModelState.READY:
            continue  # loading, failed, or lazy and not yet used: never load for a rehearsal
        model = registry.get(name)
        if name == SENTIMENT_MODEL:
            jobs.append(("sentiment.analyze", ("warm up",), {}))
            jobs.append(("sentiment.analyze_batch", (["warm up", "a second text"],), {}))
        elif isinstance(model, SklearnPipeline) and model.n_features:
            jobs.append(("clustering.assign", ([[0.0] * model.n_features],), {"model": name}))
        elif isinstance(model, ProphetForecaster | ArimaForecaster):
            jobs.append(("forecast.predict", (name, 1), {}))
        example = model.example()
        if example is not None:  # every family, plugins included: the generic task
            jobs.append(("models.predict", (name, example), {}))
    return jobs


def rehearse(
    registry: ModelRegistry, *, rounds: int = ROUNDS, fits: bool = False
) -> tuple[int, int]:
    """Run the rehearsal jobs ``rounds`` times; returns (jobs, failed jobs)."""
    from celery import current_app

    jobs = rehearsal_jobs(registry, fits=fits)
    if not jobs:
        return 0, 0
    trace_log = logging.getLogger("celery.app.trace")  # its "Task ... succeeded" lines
    level = trace_log.level
    trace_log.setLevel(logging.WARNING)
    failed: set[int] = set()
    t0 = time.perf_counter()
    try:
        with registry.uncounted():
            for _ in range(rounds):
                for index, (task_name, args, kwargs) in enumerate(jobs):
                    if index in failed:
                        continue
                    try:
                        result = current_app.tasks[task_name].apply(
                            args, kwargs, task_id=f"rehearsal-{uuid.uuid4()}"
                        )
                        error = result.result if result.failed() else None
                    except Exception as exc:  # e.g. the task is not registered
                        error = exc
                    if error is not None:
                        failed.add(index)

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
