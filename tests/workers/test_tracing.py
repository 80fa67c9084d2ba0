"""Tracing through real workers (workers/tracing.py): a web request's span, the client's send
span and the worker's run span are one trace.

This test process plays the web app: an SDK tracer provider whose spans stay in memory. The
workers export theirs through ``tests.support.spans`` (``TRACING=tests.support.spans:exporter``),
one JSON line per span in a file; ``OTEL_BSP_SCHEDULE_DELAY`` is set far beyond the test, so
that the spans reach the file only through the flush at process shutdown.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from harness import WorkerProcess, close_app, wait_for, write_manifest
from shared.errors import InvalidInput
from tests.conftest import REPOSITORY
from tests.support.spans import FILE_VARIABLE, read_spans
from workers.client import AsyncModelClient, ModelClient

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
TIMEOUT = 60.0
EXPORTER = "tests.support.spans:exporter"
NO_TIMED_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "600000"}  # ms: spans leave only at shutdown


@pytest.fixture
def web_spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """This process set up as a web app sets up tracing: a global SDK tracer provider, its
    spans kept in memory. The process's global provider is put back afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "webapp"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    """(trace id, span id) in the W3C hex the span file uses."""
    context = span.get_span_context()
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def sends(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The client's send spans by task id."""
    return {
        str((s.attributes or {})["messaging.message.id"]): s
        for s in exporter.get_finished_spans()
        if s.name.startswith("send/")
    }


def runs(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The workers' run spans by task id."""
    return {
        s["attributes"]["messaging.message.id"]: s for s in spans if s["name"].startswith("run/")
    }


def recording_worker(
    start_worker: Start, folder: Path, *, env: dict[str, str], delay: float = 0.0, **kw: Any
) -> WorkerProcess:
    """A worker whose "sentiment" model is tests.support.families' RecordingClassifier (starts
    in seconds; ``delay`` keeps each call busy so that requests can meet in a pool batch)."""
    manifest = write_manifest(
        folder,
        [
            {
                "name": "sentiment",
                "family": "test",
                "implementation": "tests.support.families:RecordingClassifier",
                "required": True,
                "options": {"record": str(folder / "calls.jsonl"), "delay": delay},
            }
        ],
    )
    return start_worker(env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), **env}, **kw)


def model_calls(folder: Path) -> list[dict[str, Any]]:
    """The recording model's calls for requests (the rehearsal's left out)."""
    path = folder / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if not r["texts"][0].startswith("warm up")]


def client_for(worker: WorkerProcess) -> ModelClient:
    return ModelClient(
        worker.redis_url, queue=worker.queue, key_prefix=worker.prefix, timeout=TIMEOUT
    )


# ---- one trace -------------------------------------------------------------------------------
def test_a_web_request_the_clients_send_and_the_task_run_are_one_trace(
    start_worker: Start, tmp_path: Path, web_spans: InMemorySpanExporter
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("sentiment", "textblob"):  # the project's small transformers model
        (repo / name).symlink_to(REPOSITORY / name, target_is_directory=True)
    span_file = tmp_path / "spans.jsonl"
    worker = start_worker(
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(repo),
            "MODELWORKERS_TRACING": EXPORTER,
            FILE_VARIABLE: str(span_file),
            **NO_TIMED_EXPORT,
        },
    )
    worker.wait_ready(2, timeout=120)
    tracer = trace.get_tracer("webapp")
    request = tracer.start_as_current_span("GET /reviews", kind=trace.SpanKind.SERVER)
    with client_for(worker) as client, request:
        assert client.analyze("An absolute delight.").label == "positive"
        assert client.predict("sentiment", "Dull and slow.").outputs["label"] == "negative"

    async def from_an_event_loop() -> str:
        async with AsyncModelClient(
            worker.redis_url, queue=worker.queue, key_prefix=worker.prefix, timeout=TIMEOUT
        ) as ac:
            with tracer.start_as_current_span("GET /async", kind=trace.SpanKind.SERVER):
                return (await ac.analyze("Wonderful.")).label

    assert asyncio.run(from_an_event_loop()) == "positive"

    # Trace headers that are not a trace context: the task runs, in a trace of its own.
    app = worker.app()
    try:
        odd = app.send_task(
            "sentiment.analyze",
            ["Fine."],
            headers={"traceparent": "00-not-a-trace-01", "tracestate": "=,=", "baggage": "%%"},
        )
        assert odd.get(timeout=TIMEOUT)["model"] == "sentiment"
    finally:
        close_app(app)

    assert not span_file.exists()  # nothing exported yet: the schedule delay is 10 minutes
    worker.stop()

    exported = read_spans(span_file)
    ran = runs(exported)
    sent = sends(web_spans)
    requests = {s.name: s for s in web_spans.get_finished_spans() if s.kind.name == "SERVER"}
    assert set(requests) == {"GET /reviews", "GET /async"}
    assert len(sent) == 3
    assert set(ran) == {*sent, odd.id}, "one run span per task; none for the rehearsal's runs"
    assert not [s for s in exported if s["attributes"]["messaging.message.id"].startswith("reh")]

    for task_id, send in sent.items():
        run = ran[task_id]
        trace_id, send_id = hex_ids(send)
        assert send.kind is trace.SpanKind.PRODUCER
        assert send.parent is not None
        request = next(r for r in requests.values() if r.context.span_id == send.parent.span_id)
        assert hex_ids(request)[0] == trace_id
        assert run["trace_id"] == trace_id and run["parent_id"] == send_id
        assert run["kind"] == "CONSUMER" and run["status"] == "UNSET"
        task = str((send.attributes or {})["celery.task_name"])
        assert run["name"] == f"run/{task}" and run["attributes"]["celery.task_name"] == task
        assert run["attributes"]["celery.action"] == "run"
        assert dict(send.attributes or {}) == {
            "messaging.system": "celery",
            "messaging.operation.type": "send",
            "messaging.destination.name": worker.queue,
            "messaging.message.id": task_id,
            "celery.action": "apply_async",
            "celery.task_name": task,
        }
        assert run["resource"]["service.name"] == "modelworkers"
        assert run["pid"] != worker.pid and run["resource"]["process.pid"] == run["pid"]
    names = sorted(ran[i]["name"] for i in sent)
    assert names == ["run/models.predict", "run/sentiment.analyze", "run/sentiment.analyze"]
    assert ran[odd.id]["parent_id"] is None
    assert ran[odd.id]["trace_id"] not in {hex_ids(s)[0] for s in sent.values()}


# ---- every pool ------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_the_solo_and_threads_pools_trace_in_their_main_process_and_flush_at_shutdown(
    start_worker: Start, tmp_path: Path, web_spans: InMemorySpanExporter, pool: str
) -> None:
    span_file = tmp_path / "spans.jsonl"
    worker = recording_worker(
        start_worker,
        tmp_path,
        pool=pool,
        concurrency=1,
        env={
            "MODELWORKERS_TRACING": EXPORTER,
            FILE_VARIABLE: str(span_file),
            "MODELWORKERS_TRACING_SERVICE_NAME": f"workers-{pool}",
            **NO_TIMED_EXPORT,
        },
    )
    worker.wait_ready(1, timeout=90)
    with client_for(worker) as client, trace.get_tracer("webapp").start_as_current_span("job"):
        assert client.analyze("good").label == "positive"
        with pytest.raises(InvalidInput):
            client.analyze("")
    worker.stop()

    sent = sends(web_spans)
    exported = read_spans(span_file)
    assert [s["name"] for s in exported] == ["run/sentiment.analyze"] * 2
    ran = runs(exported)
    assert set(ran) == set(sent)
    for task_id, run in ran.items():
        assert (run["trace_id"], run["parent_id"]) == hex_ids(sent[task_id])
        assert run["pid"] == worker.pid  # no pool process: the main process ran it
        assert run["resource"]["service.name"] == f"workers-{pool}"
    states = sorted((r["attributes"]["celery.state"], r["status"]) for r in ran.values())
    assert states == [("FAILURE", "ERROR"), ("SUCCESS", "UNSET")]


# ---- prefork batching ------------------------------------------------------------------------
def test_requests_answered_in_one_pool_batch_each_keep_their_own_run_span_and_parent(
    start_worker: Start, tmp_path: Path, web_spans: InMemorySpanExporter
) -> None:
    span_file = tmp_path / "spans.jsonl"
    worker = recording_worker(
        start_worker,
        tmp_path,
        delay=0.5,
        concurrency=2,
        env={"MODELWORKERS_TRACING": EXPORTER, FILE_VARIABLE: str(span_file), **NO_TIMED_EXPORT},
    )
    worker.wait_ready(2, timeout=90)
    tracer = trace.get_tracer("webapp")
    texts = [f"request {i} {'good' if i % 2 else 'bad'}" for i in range(8)]
    task_of_request: dict[str, str] = {}
    lock = threading.Lock()

    with client_for(worker) as client:

        def web_request(text: str) -> None:
            with tracer.start_as_current_span(f"POST {text}"):
                task_id = client.send("sentiment.analyze", text)
                with lock:
                    task_of_request[text] = task_id
                client.result(task_id)

        # Two slow requests keep both pool processes busy; the rest wait and meet in batches.
        first = [threading.Thread(target=web_request, args=(t,)) for t in texts[:2]]
        for thread in first:
            thread.start()
        wait_for(lambda: len(model_calls(tmp_path)) == 2, 30, "both pool processes busy")
        rest = [threading.Thread(target=web_request, args=(t,)) for t in texts[2:]]
        for thread in rest:
            thread.start()
        for thread in first + rest:
            thread.join(timeout=TIMEOUT)
            assert not thread.is_alive()
    worker.stop()

    calls = [c["texts"] for c in model_calls(tmp_path)]
    batches = [c for c in calls if len(c) > 1]
    assert batches, f"no requests met in a pool batch: {calls}"

    exported = read_spans(span_file)
    ran = runs(exported)
    sent = sends(web_spans)
    requests = {s.name: s for s in web_spans.get_finished_spans() if s.name.startswith("POST")}
    assert set(ran) == set(sent) == set(task_of_request.values())
    for text, task_id in task_of_request.items():
        trace_id, send_id = hex_ids(sent[task_id])
        assert hex_ids(requests[f"POST {text}"])[0] == trace_id
        assert (ran[task_id]["trace_id"], ran[task_id]["parent_id"]) == (trace_id, send_id)
    # The batch's shared model call: one span per batch, linked to each request's send span.
    batch_spans = [s for s in exported if s["name"] == "pool_batch"]
    assert len(batch_spans) == len(batches)
    for span in batch_spans:
        assert span["parent_id"] is None
        count = span["attributes"]["messaging.batch.message_count"]
        assert len(span["links"]) == count >= 2
        for link in span["links"]:
            task_id = link["attributes"]["messaging.message.id"]
            assert (link["trace_id"], link["span_id"]) == hex_ids(sent[task_id])


# ---- off, and refused --------------------------------------------------------------------------
def test_tracing_off_exports_nothing_yet_the_traced_client_is_served(
    start_worker: Start, tmp_path: Path, web_spans: InMemorySpanExporter
) -> None:
    span_file = tmp_path / "spans.jsonl"
    worker = recording_worker(
        start_worker, tmp_path, pool="solo", concurrency=1, env={FILE_VARIABLE: str(span_file)}
    )
    worker.wait_ready(1, timeout=90)
    with client_for(worker) as client, trace.get_tracer("webapp").start_as_current_span("job"):
        assert client.analyze("good").label == "positive"
    worker.stop()
    assert len(sends(web_spans)) == 1  # the client traced its send; the worker had no tracer
    assert not span_file.exists()


@pytest.mark.parametrize(
    ("tracing", "blocked", "expected"),
    [
        (
            "console",
            "opentelemetry.instrumentation.celery",
            "needs opentelemetry-instrumentation-celery, which cannot be imported",
        ),
        ("otlp", "opentelemetry.exporter.otlp.proto.http.trace_exporter", "pip install"),
        ("tests.support.spans:no_such_exporter", None, "module tests.support.spans has no"),
    ],
    ids=["instrumentation missing", "otlp exporter missing", "no such callable"],
)
def test_a_worker_whose_tracing_cannot_be_set_up_does_not_start(
    start_worker: Start, tmp_path: Path, tracing: str, blocked: str | None, expected: str
) -> None:
    env = {"MODELWORKERS_TRACING": tracing, FILE_VARIABLE: str(tmp_path / "spans.jsonl")}
    if blocked:  # the package as if not installed: its import fails in the worker
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{blocked!r}] = None\n")
        env["PYTHONPATH"] = str(site)
    worker = recording_worker(start_worker, tmp_path, pool="solo", concurrency=1, env=env)
    assert worker.proc is not None
    assert worker.proc.wait(timeout=60) == 1
    log = worker.log()
    assert f"the worker does not start: MODELWORKERS_TRACING={tracing}: " in log and expected in log
    if blocked:
        assert "pip install modelworkers[tracing]" in log
    assert not worker.snapshots()


# ---- to a collector over OTLP ------------------------------------------------------------------
class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps each POST /v1/traces body."""

    bodies: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path == "/v1/traces":
            self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_otlp_sends_the_run_spans_to_the_collector_at_the_standard_endpoint(
    start_worker: Start, tmp_path: Path, web_spans: InMemorySpanExporter
) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    handler = type("Collector", (_Collector,), {"bodies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        worker = recording_worker(
            start_worker,
            tmp_path,
            pool="solo",
            concurrency=1,
            env={
                "MODELWORKERS_TRACING": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
                "OTEL_SERVICE_NAME": "otlp-workers",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            },
        )
        worker.wait_ready(1, timeout=90)
        job = trace.get_tracer("webapp").start_as_current_span("job")
        with client_for(worker) as client, job:
            task_id = client.send("sentiment.analyze", "good")
            client.result(task_id)

        def received() -> list[tuple[str, str, bytes, str]]:
            found = []
            for body in list(handler.bodies):
                request = ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    )
                    for scope in resource_spans.scope_spans:
                        found += [
                            (s.name, service, s.parent_span_id, s.trace_id.hex())
                            for s in scope.spans
                        ]
            return found

        (name, service, parent, trace_id), *_ = wait_for(received, 20, "spans at the collector")
        worker.stop()
    finally:
        server.shutdown()
        server.server_close()
    send = sends(web_spans)[task_id]
    assert (name, service) == ("run/sentiment.analyze", "otlp-workers")
    assert (trace_id, parent.hex()) == hex_ids(send)
    assert uuid.UUID(task_id)
