"""Prometheus metrics per model and process, safe under prefork (prometheus-client multiprocess).

Nothing is created at import. A worker's main process calls :func:`enable` when it starts (with
METRICS_PORT set), before its pool forks: every process then writes its own files into one
directory, the pool processes inherit the metric objects, and the main process serves them all on
METRICS_PORT (:func:`serve`). Until ``enable`` runs, every ``record_*`` here is a no-op, so a web
app or a notebook that uses the registry pays nothing.

    modelworkers_model_load_seconds{model,version}           gauge, per live process
    modelworkers_model_ready{model,version,status}           gauge 1/0, per live process
    modelworkers_model_required{model}                       gauge 1/0, per live process
    modelworkers_inference_total{model,version}              counter
    modelworkers_inference_failures_total{model,version}     counter
    modelworkers_inference_seconds{model,version}            histogram
    modelworkers_inference_errors_total{model,version,kind}  counter (error, timeout, bad_batch)
    modelworkers_fallback_answers_total{model,fallback}      counter
    modelworkers_messages_refused_total{reason}              counter (worker main process)
    modelworkers_poison_tasks_total{task}                    counter (worker main process)
    modelworkers_model_loads_total{model,version}            counter
    modelworkers_model_evictions_total{model,version}        counter (memory budget)
    modelworkers_model_memory_bytes{model,version}           gauge, per live process
    modelworkers_queue_depth{queue}                          gauge, on scrape (QueueCollector)
    modelworkers_queue_oldest_age_seconds{queue}             gauge, on scrape (QueueCollector)

"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from shared.queues import PRIORITY_STEPS, QueueStats, queue_stats
from shared.urls import redact

log = logging.getLogger("modelworkers.metrics")

STATES = ("LOADING", "READY", "FAILED", "UNLOADED")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """The metric objects of this process (and of the pool processes forked from it)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.load_seconds = Gauge(
            "modelworkers_model_load_seconds",
            "Seconds the last load took",
            ["model", "version"],
            multiprocess_mode="liveall",
        )
        self.model_state = Gauge(
            "modelworkers_model_ready",
            "1 for the model's current status",
            ["model", "version", "status"],
            multiprocess_mode="liveall",
        )
        self.required = Gauge(
            "modelworkers_model_required",
            "1 when the model is required (the process is not ready without it), 0 if optional",
            ["model"],
            multiprocess_mode="liveall",
        )
        self.calls = Counter("modelworkers_inference", "Inference calls", ["model", "version"])
        self.failures = Counter(
            "modelworkers_inference_failures", "Failed inference calls", ["model", "version"]
        )
        self.latency = Histogram(
            "modelworkers_inference_seconds",
            "Inference latency",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
        )
        self.inference_errors = Counter(
            "modelworkers_inference_errors",
            "Inference calls that raised, timed out or broke the batch contract",
            ["model", "version", "kind"],
        )
        self.fallbacks = Counter(
            "modelworkers_fallback_answers",
            "Answers given by a model's fallback because the model could not",
            ["model", "fallback"],
        )
        self.refused = Counter(
            "modelworkers_messages_refused",
            "Task messages refused before any task code ran",
            ["reason"],
        )
        self.loads = Counter(
            "modelworkers_model_loads",
            "Loads of a model version in a process (at start, on first use, reload, load)",
            ["model", "version"],
        )
        self.evictions = Counter(
            "modelworkers_model_evictions",
            "Versions unloaded to keep a process within its memory budget",
            ["model", "version"],
        )
        self.memory = Gauge(
            "modelworkers_model_memory_bytes",
            "Memory a loaded model version measured (0 once unloaded)",
            ["model", "version"],
            multiprocess_mode="liveall",
        )
        self.batch_size = Histogram(
            "modelworkers_batch_inputs",
            "Inputs per model call (requests that shared one forward pass)",
            ["model"],
            buckets=BATCH_BUCKETS,
        )
        self.poison = Counter(
            "modelworkers_poison_tasks",
            "Tasks failed as PoisonTask after killing their pool process too often",
            ["task"],
        )


_metrics: Metrics | None = None


def enable(directory: Path) -> Path:
    """Turn metrics on in this process and the processes it forks, files in ``directory``.

    Files of an earlier run are removed (prometheus-client's multiprocess mode keeps one file per
    pid: old counters would add up). Call once, in a worker's main process, before it forks.
    """
    global _metrics
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    from prometheus_client import values

    # prometheus-client decides between its single- and multi-process value class when it is
    # first imported. Under `celery worker` that is before this directory is known (Celery's CLI
    # imports Flower's command, which imports prometheus-client): decide again now.
    values.ValueClass = values.get_value_class()
    if _metrics is None:
        _metrics = Metrics()
    return directory


def enabled() -> bool:
    return _metrics is not None


def record_state(meta: Any) -> None:
    """Registry listener: status and load time of one version of a model in this process (a
    retired version reports UNLOADED, so only the versions that serve count as READY)."""
    m = _metrics
    if m is None:
        return
    for status in STATES:
        m.model_state.labels(meta.name, meta.version, status).set(
            1 if str(meta.status) == status else 0
        )
    m.required.labels(meta.name).set(1 if getattr(meta, "required", True) else 0)
    if meta.load_seconds is not None:
        m.load_seconds.labels(meta.name, meta.version).set(meta.load_seconds)
    loaded = str(meta.status) == "READY" and meta.memory_delta_mb is not None
    m.memory.labels(meta.name, meta.version).set(meta.memory_delta_mb * 2**20 if loaded else 0)


def record_event(kind: str, meta: Any) -> None:
    """Registry event observer: a version loaded, or evicted for the memory budget."""
    m = _metrics
    if m is None:
        return
    if kind == "loaded":
        m.loads.labels(meta.name, meta.version).inc()
    elif kind == "evicted":
        m.evictions.labels(meta.name, meta.version).inc()


def record_call(model: str, version: str, seconds: float, ok: bool) -> None:
    """Registry call observer: one served call."""
    m = _metrics
    if m is None:
        return
    m.calls.labels(model, version).inc()
    m.latency.labels(model, version).observe(seconds)
    if not ok:
        m.failures.labels(model, version).inc()


def record_batch(model: str, inputs: int) -> None:
    """One model call that answered ``inputs`` inputs together."""
    if _metrics is not None:
        _metrics.batch_size.labels(model).observe(inputs)


def record_inference_error(model: str, version: str, kind: str) -> None:
    if _metrics is not None:
        _metrics.inference_errors.labels(model, version, kind).inc()


def record_fallback(model: str, fallback: str) -> None:
    if _metrics is not None:
        _metrics.fallbacks.labels(model, fallback).inc()


def record_refused(reason: str) -> None:
    if _metrics is not None:
        _metrics.refused.labels(reason).inc()


def record_poison(task: str) -> None:
    if _metrics is not None:
        _metrics.poison.labels(task).inc()


def mark_process_dead(pid: int) -> None:
    if _metrics is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(port: int, address: str = "0.0.0.0", collectors: Iterable[Any] = ()) -> Any:
    """Serve every process's metrics on ``port`` (call in the worker's main process), and what
    ``collectors`` (e.g. a :class:`QueueCollector`) compute on each scrape."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in collectors:
        registry.register(collector)
    return start_http_server(port, addr=address, registry=registry)


class QueueCollector:
    """Queue depth and oldest waiting message of the queues a node consumes, read from the
    broker on each scrape (shared.queues): from Redis with ``client``, or by ``read`` (a
    function of the queue names, e.g. RabbitMQ's :func:`~shared.queues.amqp_queue_stats`).
    They should answer fast (a short socket timeout): when the broker cannot be read, the
    scrape still answers, without these two metrics."""

    def __init__(
        self,
        client: Any,
        queues: Iterable[str],
        prefix: str,
        *,
        priority_steps: Sequence[int] = PRIORITY_STEPS,
        global_keyprefix: str = "",
        read: Callable[[list[str]], list[QueueStats]] | None = None,
    ) -> None:
        self.client = client
        self.queues = sorted(set(queues))
        self.prefix = prefix
        self.priority_steps = tuple(priority_steps)
        self.global_keyprefix = global_keyprefix
        self.read = read
        self.failing = False

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration (and no broker call then)

    def stats(self) -> list[QueueStats]:
        if self.read is not None:
            return self.read(self.queues)
        return queue_stats(
            self.client,
            self.queues,
            self.prefix,
            priority_steps=self.priority_steps,
            global_keyprefix=self.global_keyprefix,
        )

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            stats = self.stats()
        except Exception as exc:
            if not self.failing:
                log.warning("queue metrics: cannot read the broker (%s)", redact(str(exc)))
            self.failing = True
            return
        if self.failing:
            log.info("queue metrics: the broker answers again")
        self.failing = False
        depth = GaugeMetricFamily(
            "modelworkers_queue_depth",
            "Messages waiting in the queue (on Redis: every priority list), read from the broker "
            "on scrape",
            labels=["queue"],
        )
        oldest = GaugeMetricFamily(
            "modelworkers_queue_oldest_age_seconds",
            "How long the oldest waiting message has been seen at the queue's tail (a lower "
            "bound of its wait; 0 when the queue is empty). Redis only: RabbitMQ cannot tell",
            labels=["queue"],
        )
        for item in stats:
            depth.add_metric([item.queue], item.depth)
            if item.oldest_age_seconds is not None:
                oldest.add_metric([item.queue], round(item.oldest_age_seconds, 3))
        yield depth
        yield oldest
