"""OpenTelemetry tracing (TRACING): one trace from a client's send to the task's run.

Nothing here imports OpenTelemetry at import time. A worker with TRACING unset never imports it,
and a client sends without a span unless its process has configured a tracer provider.

* **The worker's main process** resolves TRACING in ``worker_init`` (:func:`configure`): the SDK,
  Celery's instrumentation and the exporter's module are imported there, so that every prefork
  pool process inherits the imports, and the exporter is built once to check it. A missing
  package or an exporter that cannot be built raises :class:`~shared.errors.TracingUnavailable`,
  and the worker exits instead of serving without traces.
* **Each serving process** (a prefork child after fork; the solo and threads pools' main
  process) starts its own :class:`ProcessTracing` in ``ServingProcess.start``, after the
  rehearsal (whose eager runs would otherwise be traced as requests nobody sent): a
  ``TracerProvider`` whose ``BatchSpanProcessor`` export thread belongs to that process (a
  thread does not survive fork, so none may exist before it), and ``CeleryInstrumentor``, which
  makes each task run a CONSUMER span ``run/<task name>``, child of the context found in the
  message's headers. At process shutdown the spans still queued are exported, waiting at most
  ``SHUTDOWN_SECONDS``.
* **A pool batch** (``workers.poolbatch``) answers several requests with one model call before
  each request runs: that call is one span ``pool_batch``, linked to each request's send span
  (:meth:`ProcessTracing.batch_span`); each request keeps its own ``run`` span in its own trace.
* **The client** (``workers.client``) wraps each send in a PRODUCER span ``send/<task name>``,
  child of the caller's current span, and puts its context in the message's headers
  (:func:`client_tracer`, :func:`send_span`). Celery's instrumentation cannot do that for
  ``send_task``: it ends its publish span only for a task registered in the sending process.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from shared.errors import TracingUnavailable
from shared.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import Tracer

log = logging.getLogger("modelworkers.worker")

EXTRA = "pip install modelworkers[tracing]"
# A process's last export: an unreachable collector must not hold up the process's exit.
SHUTDOWN_SECONDS = 5.0
DEFAULT_SERVICE_NAME = "modelworkers"
# TRACING's named exporters: the class, the package that provides it, how to install it.
EXPORTERS = {
    "otlp": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter:OTLPSpanExporter",
        "opentelemetry-exporter-otlp-proto-http",
        EXTRA,
    ),
    "otlp-grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter:OTLPSpanExporter",
        "opentelemetry-exporter-otlp-proto-grpc",
        "pip install opentelemetry-exporter-otlp-proto-grpc",
    ),
    "console": ("opentelemetry.sdk.trace.export:ConsoleSpanExporter", "opentelemetry-sdk", EXTRA),
}
# What every TRACING needs, and the package of each.
REQUIRED = (
    ("opentelemetry.sdk.trace", "opentelemetry-sdk"),
    ("opentelemetry.instrumentation.celery", "opentelemetry-instrumentation-celery"),
)


# ---- the worker: resolved once in the main process -----------------------------------------
@dataclass(frozen=True)
class TracingConfig:
    """TRACING as the worker's main process resolved it; each serving process starts from it."""

    choice: str
    exporter: Callable[[], Any]  # builds a SpanExporter; called once in each serving process
    service_name: str | None = None


def configure(settings: Settings) -> TracingConfig | None:
    """Resolve TRACING (the worker's main process, before the pool starts): None when it is
    off, and then nothing is imported. Else import what it needs and build the exporter once to
    check it; raises :class:`~shared.errors.TracingUnavailable` naming what is missing."""
    choice = settings.tracing
    if choice is None:
        return None
    for module, package in REQUIRED:
        _import(choice, module, package, EXTRA)
    _check_celery_instrumentation(choice)
    if choice in EXPORTERS:
        target, package, install = EXPORTERS[choice]
        factory = _load_callable(choice, target, package, install)
    else:  # module:callable (shared.settings checked its shape)
        target = choice
        factory = _load_callable(choice, target, None, None)
    _check_exporter(choice, target, factory)
    return TracingConfig(choice, factory, settings.tracing_service_name)


def _import(choice: str, module: str, package: str | None, install: str | None) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if package is not None:
            problem = f"needs {package}, which cannot be imported ({exc}): {install}"
        else:
            problem = f"cannot import {module} ({exc})"
        raise TracingUnavailable(choice, problem) from exc
    except Exception as exc:  # a module:callable of the user's that fails as it is imported
        raise TracingUnavailable(choice, f"cannot import {module}: {exc!r}") from exc


def _load_callable(
    choice: str, target: str, package: str | None, install: str | None
) -> Callable[[], Any]:
    module_name, _, path = target.partition(":")
    found: Any = _import(choice, module_name, package, install)
    for part in path.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise TracingUnavailable(choice, f"module {module_name} has no {path}")
    if not callable(found):
        raise TracingUnavailable(choice, f"{target} is not callable")
    return found  # type: ignore[no-any-return]


def _check_celery_instrumentation(choice: str) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

    conflict = get_dependency_conflicts(CeleryInstrumentor().instrumentation_dependencies())
    if conflict is not None:
        raise TracingUnavailable(choice, f"Celery's instrumentation cannot trace here: {conflict}")


def _check_exporter(choice: str, target: str, factory: Callable[[], Any]) -> None:
    """Build the exporter once and shut it down: one that cannot be built stops the worker
    here rather than leave every pool process without traces."""
    from opentelemetry.sdk.trace.export import SpanExporter

    try:
        exporter = factory()
    except Exception as exc:
        raise TracingUnavailable(choice, f"{target}() failed: {exc!r}") from exc
    try:
        if not isinstance(exporter, SpanExporter):
            raise TracingUnavailable(
                choice, f"{target}() returned {type(exporter).__name__}, not a SpanExporter"
            )
    finally:
        with suppress(Exception):
            exporter.shutdown()


def resource(config: TracingConfig) -> Resource:
    """The serving process's resource: service.name (TRACING_SERVICE_NAME, else
    OTEL_SERVICE_NAME, else "modelworkers"), process.pid, and OTEL_RESOURCE_ATTRIBUTES."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes: dict[str, str | int] = {"process.pid": os.getpid()}
    if config.service_name:
        attributes[SERVICE_NAME] = config.service_name
    found = Resource.create(attributes)
    if str(found.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        found = found.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return found


# ---- the worker: one per serving process ---------------------------------------------------
class ProcessTracing:
    """One serving process's tracing: its TracerProvider, batch span processor (and so its
    export thread) and Celery's instrumentation. Created in the process that serves, after
    fork; :meth:`stop` exports what is left when the process shuts down."""

    def __init__(self, config: TracingConfig) -> None:
        from opentelemetry import trace
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.pid = os.getpid()
        # shutdown_on_exit off: a prefork child leaves through os._exit (no atexit); stop() runs
        # from the shutdown signals in every pool instead, bounded.
        self.provider = TracerProvider(resource=resource(config), shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(config.exporter()))
        trace.set_tracer_provider(self.provider)  # spans a model or task opens join the trace
        self.tracer = self.provider.get_tracer("modelworkers.worker")
        self.instrumentor = CeleryInstrumentor()
        # checked once in the main process (configure)
        self.instrumentor.instrument(tracer_provider=self.provider, skip_dep_check=True)

    def stop(self, timeout: float = SHUTDOWN_SECONDS) -> bool:
        """Trace no more task runs, export the spans still queued and shut the exporter down,
        waiting at most ``timeout`` s; False when that was not enough (those spans are lost)."""
        self.instrumentor.uninstrument()
        done = threading.Thread(target=self.provider.shutdown, name="tracing-shutdown", daemon=True)
        done.start()
        done.join(timeout)
        if done.is_alive():
            log.warning("pid %d: spans not exported within %g s at shutdown", self.pid, timeout)
            return False
        return True

    @contextmanager
    def batch_span(self, requests: Sequence[Mapping[str, Any]]) -> Iterator[None]:
        """The span of a pool batch's shared model call: a new trace, linked to the send span of
        each request (``requests``: their headers) and counting them."""
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.propagate import extract

        links = []
        for headers in requests:
            carrier = {k: v for k, v in headers.items() if isinstance(v, str)}
            try:
                sender = trace.get_current_span(extract(carrier)).get_span_context()
            except Exception:  # a request's bad trace headers: no link for it, never a failure
                continue
            if sender.is_valid:
                links.append(trace.Link(sender, {"messaging.message.id": carrier.get("id", "")}))
        with self.tracer.start_as_current_span(
            "pool_batch",
            context=Context(),  # a root: the batch belongs to no one request's trace
            kind=trace.SpanKind.INTERNAL,
            links=links,
            attributes={"messaging.batch.message_count": len(requests)},
        ):
            yield


def start(config: TracingConfig) -> ProcessTracing | None:
    """This serving process's tracing. An exporter that fails here (it was built once in the
    main process) leaves this process without traces, said once at ERROR, rather than not
    serving at all."""
    try:
        return ProcessTracing(config)
    except Exception:
        log.exception(
            "pid %d: tracing (MODELWORKERS_TRACING=%s) could not start", os.getpid(), config.choice
        )
        return None


# ---- the client --------------------------------------------------------------------------
_client_tracer: tuple[Any, Any] | None = None  # (provider, tracer) of the latest send


def client_tracer() -> Tracer | None:
    """The tracer of a client's sends: None unless this process has set a tracer provider. A
    process that never imported OpenTelemetry cannot have one, and nothing is imported."""
    global _client_tracer
    trace: Any = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    cached = _client_tracer
    if cached is None or cached[0] is not provider:
        cached = _client_tracer = (provider, provider.get_tracer("modelworkers.client"))
    return cached[1]  # type: ignore[no-any-return]


@contextmanager
def send_span(tracer: Tracer, task_name: str, task_id: str, queue: str) -> Iterator[dict[str, str]]:
    """A PRODUCER span ``send/<task name>`` around one publish, child of the caller's current
    span; yields the message headers that carry its context (``traceparent``, ``tracestate``,
    baggage: the propagators configured) to the worker."""
    from opentelemetry.propagate import inject
    from opentelemetry.trace import SpanKind

    attributes = {
        "messaging.system": "celery",
        "messaging.operation.type": "send",
        "messaging.destination.name": queue,
        "messaging.message.id": task_id,
        "celery.action": "apply_async",
        "celery.task_name": task_name,
    }
    with tracer.start_as_current_span(
        f"send/{task_name}", kind=SpanKind.PRODUCER, attributes=attributes
    ):
        headers: dict[str, str] = {}
        inject(headers)
        yield headers
