"""Prometheus metrics per model and process, safe under prefork (prometheus-client multiprocess).

Enabled when ``PROMETHEUS_MULTIPROC_DIR`` is set before this module is first imported (the worker
sets it in its main process before the pool forks, when METRICS_PORT is set). Every pool process
writes its own files there; the worker's main process serves them all on METRICS_PORT.
Without it every function here is a no-op.

    modelworkers_model_load_seconds{model,version}           gauge, per live process
    modelworkers_model_ready{model,version,status}           gauge 1/0, per live process
    modelworkers_inference_total{model,version}              counter
    modelworkers_inference_failures_total{model,version}     counter
    modelworkers_inference_seconds{model,version}            histogram
"""

from __future__ import annotations

import os
from typing import Any

ENABLED = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
STATES = ("LOADING", "READY", "FAILED", "UNLOADED")

if ENABLED:
    from prometheus_client import Counter, Gauge, Histogram, values

    # prometheus_client picks its value class when first imported; under `celery worker` that
    # happens before PROMETHEUS_MULTIPROC_DIR is set (Flower's CLI plugin imports it), so pick
    # again now that the directory is known.
    values.ValueClass = values.get_value_class()

    LOAD_SECONDS = Gauge(
        "modelworkers_model_load_seconds",
        "Seconds the last load took",
        ["model", "version"],
        multiprocess_mode="liveall",
    )
    MODEL_STATE = Gauge(
        "modelworkers_model_ready",
        "1 for the model's current status",
        ["model", "version", "status"],
        multiprocess_mode="liveall",
    )
    CALLS = Counter("modelworkers_inference", "Inference calls", ["model", "version"])
    FAILURES = Counter(
        "modelworkers_inference_failures", "Failed inference calls", ["model", "version"]
    )
    LATENCY = Histogram(
        "modelworkers_inference_seconds",
        "Inference latency",
        ["model", "version"],
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )


_versions: dict[str, str] = {}


def record_state(meta: Any) -> None:
    """Registry listener: status and load time of a model in this process."""
    if not ENABLED:
        return
    previous = _versions.get(meta.name)
    if previous is not None and previous != meta.version:
        for status in STATES:  # the replaced version no longer serves here
            MODEL_STATE.labels(meta.name, previous, status).set(0)
        LOAD_SECONDS.labels(meta.name, previous).set(0)
    _versions[meta.name] = meta.version
    for status in STATES:
        MODEL_STATE.labels(meta.name, meta.version, status).set(
            1 if str(meta.status) == status else 0
        )
    if meta.load_seconds is not None:
        LOAD_SECONDS.labels(meta.name, meta.version).set(meta.load_seconds)


def record_call(model: str, version: str, seconds: float, ok: bool) -> None:
    if not ENABLED:
        return
    CALLS.labels(model, version).inc()
    LATENCY.labels(model, version).observe(seconds)
    if not ok:
        FAILURES.labels(model, version).inc()


def mark_process_dead(pid: int) -> None:
    if ENABLED:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(port: int, address: str = "0.0.0.0") -> Any:
    """Serve every process's metrics on ``port`` (call in the worker's main process)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return start_http_server(port, addr=address, registry=registry)
