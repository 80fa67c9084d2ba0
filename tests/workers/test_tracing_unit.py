"""workers/tracing.py without a worker: what TRACING accepts, what a worker refuses to start
with, the client's send span, a serving process's tracing and its bounded flush. (Through real
workers: tests/workers/test_tracing.py.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once
from pydantic import ValidationError

from harness import ROOT
from shared.errors import TracingUnavailable
from shared.settings import TRACING_EXPORTERS, Settings
from tests.reliability.hostile import body, task_headers
from workers import tracing
from workers.intake import MessageLimits, check_task_message


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider for the test, its spans in memory; the process's own
    global provider is put back afterwards."""
    exporter = InMemorySpanExporter()
    sdk = TracerProvider()
    sdk.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    trace.set_tracer_provider(sdk)
    yield exporter
    sdk.shutdown()


@pytest.fixture
def no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracer provider set in this process (as in a web app that does not trace)."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# ---- the setting -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "kept"),
    [
        (None, None),
        ("", None),
        ("off", None),
        ("OFF", None),
        ("none", None),
        ("otlp", "otlp"),
        ("OTLP", "otlp"),
        ("otlp-grpc", "otlp-grpc"),
        (" console ", "console"),
        ("tests.support.spans:exporter", "tests.support.spans:exporter"),
        ("my_pkg.exporters:Factory.build", "my_pkg.exporters:Factory.build"),
    ],
)
def test_tracing_is_off_a_named_exporter_or_a_module_callable(
    given: str | None, kept: str | None
) -> None:
    assert settings(tracing=given).tracing == kept


@pytest.mark.parametrize("bad", ["jaeger", "module.only", ":callable", "a b:c", "x:y:z"])
def test_any_other_tracing_value_is_refused_naming_the_choices(bad: str) -> None:
    with pytest.raises(
        ValidationError, match="MODELWORKERS_TRACING must be off, otlp, otlp-grpc, console or"
    ):
        settings(tracing=bad)


def test_the_named_exporters_are_the_ones_the_setting_accepts() -> None:
    assert set(tracing.EXPORTERS) == set(TRACING_EXPORTERS)


# ---- off: nothing imported ---------------------------------------------------------------------
def test_tracing_unset_imports_nothing_from_opentelemetry() -> None:
    """redis-py 8 imports opentelemetry.sdk.metrics by itself when the SDK is installed (its
    own observability); that is the baseline. The worker's set-up and signal handlers, the
    client and a send's tracing check then import nothing more."""
    code = "\n".join(
        [
            "import sys",
            "import redis, celery, kombu",
            "def otel(): return {m for m in sys.modules if m.startswith('opentelemetry')}",
            "baseline = otel()",
            "from shared.settings import Settings",
            "import workers.app, workers.signals, workers.serving, workers.poolbatch",
            "from workers import tracing",
            "from workers.client import ModelClient",
            "assert tracing.configure(Settings(_env_file=None)) is None",
            "assert tracing.client_tracer() is None",
            "ModelClient('redis://127.0.0.1:1/0', queue='q', key_prefix='p').close()",
            "print(sorted(otel() - baseline))",
            "sys.exit(1 if otel() - baseline else 0)",
        ]
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- what a worker refuses to start with -----------------------------------------------------
def test_a_missing_sdk_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(TracingUnavailable) as refused:
        tracing.configure(settings(tracing="console"))
    assert str(refused.value).startswith(
        "MODELWORKERS_TRACING=console: needs opentelemetry-sdk, which cannot be imported ("
    )
    assert str(refused.value).endswith("): pip install modelworkers[tracing]")


def test_otlp_grpc_without_its_exporter_says_which_package_to_install() -> None:
    if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is not None:
        pytest.skip("the gRPC exporter is installed here")
    with pytest.raises(TracingUnavailable) as refused:
        tracing.configure(settings(tracing="otlp-grpc"))
    message = str(refused.value)
    assert message.startswith(
        "MODELWORKERS_TRACING=otlp-grpc: needs opentelemetry-exporter-otlp-proto-grpc"
    )
    assert message.endswith(": pip install opentelemetry-exporter-otlp-proto-grpc")


class NotAnExporter:
    pass


def build_nothing() -> NotAnExporter:
    return NotAnExporter()


def build_failing() -> SpanExporter:
    raise OSError("no route to the collector")


NOT_CALLABLE = 42


@pytest.mark.parametrize(
    ("choice", "problem"),
    [
        ("no_such_package.spans:exporter", "cannot import no_such_package.spans (No module"),
        ("tests.support.spans:missing", "module tests.support.spans has no missing"),
        (f"{__name__}:NOT_CALLABLE", f"{__name__}:NOT_CALLABLE is not callable"),
        (f"{__name__}:build_nothing", "build_nothing() returned NotAnExporter, not a SpanExporter"),
        (f"{__name__}:build_failing", "build_failing() failed: OSError('no route to the"),
    ],
)
def test_an_exporter_that_cannot_be_loaded_or_built_is_refused(choice: str, problem: str) -> None:
    with pytest.raises(TracingUnavailable) as refused:
        tracing.configure(settings(tracing=choice))
    assert str(refused.value).startswith(f"MODELWORKERS_TRACING={choice}: ")
    assert problem in str(refused.value)


def test_a_refusal_survives_the_result_backend_as_the_same_error() -> None:
    error = TracingUnavailable("otlp", "needs x")
    assert str(TracingUnavailable(str(error))) == str(error) == "MODELWORKERS_TRACING=otlp: needs x"


def test_named_and_module_exporters_resolve_to_what_builds_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from tests.support.spans import FILE_VARIABLE, exporter

    monkeypatch.setenv(FILE_VARIABLE, str(tmp_path / "spans.jsonl"))

    assert tracing.configure(settings()) is None
    console = tracing.configure(settings(tracing="console", tracing_service_name="svc"))
    assert console == tracing.TracingConfig("console", ConsoleSpanExporter, "svc")
    otlp = tracing.configure(settings(tracing="otlp"))
    assert otlp is not None and otlp.exporter is OTLPSpanExporter
    module = tracing.configure(settings(tracing="tests.support.spans:exporter"))
    assert module is not None and module.exporter is exporter


# ---- the resource ----------------------------------------------------------------------------
def test_service_name_is_the_setting_else_otel_service_name_else_modelworkers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def name(service: str | None) -> object:
        config = tracing.TracingConfig("console", InMemorySpanExporter, service)
        return tracing.resource(config).attributes["service.name"]

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert name(None) == "modelworkers"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert name(None) == "from-env"
    assert name("from-setting") == "from-setting"


# ---- the client ------------------------------------------------------------------------------
def test_without_a_tracer_provider_the_client_has_no_tracer(no_provider: None) -> None:
    assert tracing.client_tracer() is None


def test_a_send_span_is_a_producer_child_of_the_callers_span_and_travels_in_the_headers(
    provider: InMemorySpanExporter,
) -> None:
    tracer = tracing.client_tracer()
    assert tracer is not None and tracing.client_tracer() is tracer  # kept while unchanged
    with (
        trace.get_tracer("webapp").start_as_current_span("GET /"),
        tracing.send_span(tracer, "sentiment.analyze", "id-1", "queue-a") as headers,
    ):
        pass
    send, request = provider.get_finished_spans()
    assert send.name == "send/sentiment.analyze" and send.kind is trace.SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == request.context.span_id
    assert send.context.trace_id == request.context.trace_id
    _, trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (trace_id, parent_id) == (
        f"{send.context.trace_id:032x}",
        f"{send.context.span_id:016x}",
    )
    assert int(flags, 16) & 1  # sampled
    assert (send.attributes or {})["messaging.message.id"] == "id-1"
    assert (send.attributes or {})["messaging.destination.name"] == "queue-a"


def test_a_failed_publish_ends_its_send_span_as_an_error(provider: InMemorySpanExporter) -> None:
    tracer = tracing.client_tracer()
    assert tracer is not None
    with (
        pytest.raises(ConnectionError),
        tracing.send_span(tracer, "sentiment.analyze", "id-2", "q"),
    ):
        raise ConnectionError("Redis is down")
    (send,) = provider.get_finished_spans()
    assert send.status.status_code is trace.StatusCode.ERROR
    assert [e.name for e in send.events] == ["exception"]


# ---- intake --------------------------------------------------------------------------------
def test_the_intake_guard_accepts_the_trace_headers_a_client_injects() -> None:
    from kombu.message import Message

    headers = task_headers(
        "sentiment.analyze",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        baggage="user=alice",
    )
    msg = Message(
        body=body(["hello"]),
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={"delivery_tag": "1"},
        delivery_info={"exchange": "", "routing_key": "q"},
    )
    check_task_message(msg, MessageLimits(max_bytes=4096, max_depth=8, max_args=4))


# ---- a serving process's tracing -----------------------------------------------------------
class SlowExporter(SpanExporter):
    """Takes ``seconds`` per export (a collector that does not answer)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.exported: list[str] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        time.sleep(self.seconds)
        self.exported += [s.name for s in spans]
        return SpanExportResult.SUCCESS


@pytest.fixture
def process_tracing(
    no_provider: None,
) -> Iterator[Callable[[SpanExporter], tracing.ProcessTracing]]:
    """A serving process's tracing in this process, instrumentation undone afterwards."""
    started: list[tracing.ProcessTracing] = []

    def _start(exporter: SpanExporter) -> tracing.ProcessTracing:
        found = tracing.start(tracing.TracingConfig("test", lambda: exporter))
        assert found is not None
        started.append(found)
        return found

    yield _start
    for each in started:
        if each.instrumentor.is_instrumented_by_opentelemetry:
            each.stop(timeout=1)


def test_stop_exports_what_is_queued(
    process_tracing: Callable[..., tracing.ProcessTracing],
) -> None:
    exporter = SlowExporter(0.0)
    traced = process_tracing(exporter)
    with traced.tracer.start_as_current_span("queued"):
        pass
    assert exporter.exported == []  # the batch processor waits for its schedule
    assert traced.stop() is True
    assert exporter.exported == ["queued"]
    assert not traced.instrumentor.is_instrumented_by_opentelemetry


def test_stop_waits_at_most_its_timeout_for_a_collector_that_does_not_answer(
    process_tracing: Callable[..., tracing.ProcessTracing],
) -> None:
    traced = process_tracing(SlowExporter(3.0))
    with traced.tracer.start_as_current_span("stuck"):
        pass
    started = time.monotonic()
    assert traced.stop(timeout=0.5) is False
    assert time.monotonic() - started < 2
    assert any(t.name == "tracing-shutdown" for t in threading.enumerate())  # left behind


def test_an_exporter_that_fails_in_a_serving_process_leaves_it_serving_untraced(
    no_provider: None, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> SpanExporter:
        raise OSError("gone")

    assert tracing.start(tracing.TracingConfig("test", broken)) is None
    assert "tracing (MODELWORKERS_TRACING=test) could not start" in caplog.text


def test_a_batch_span_links_each_request_with_a_trace_context_and_skips_the_rest(
    process_tracing: Callable[..., tracing.ProcessTracing],
) -> None:
    exporter = InMemorySpanExporter()
    traced = process_tracing(exporter)
    sender = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    requests = [
        {"id": "a", "traceparent": sender},
        {"id": "b", "traceparent": "00-garbage-01"},
        {"id": "c", "traceparent": 7, "tracestate": ["x"]},
        {"id": "d"},
    ]
    with traced.batch_span(requests):
        pass
    traced.provider.force_flush()
    (batch,) = exporter.get_finished_spans()
    assert batch.name == "pool_batch" and batch.parent is None
    assert (batch.attributes or {})["messaging.batch.message_count"] == 4
    (link,) = batch.links
    assert f"{link.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{link.context.span_id:016x}" == "b7ad6b7169203331"
    assert dict(link.attributes or {}) == {"messaging.message.id": "a"}
