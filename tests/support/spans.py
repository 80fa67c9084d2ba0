"""A span exporter that test workers load by configuration (``TRACING=tests.support.spans:
exporter``): each finished span is one JSON line appended to the file named by the environment
variable ``MODELWORKERS_TEST_SPANS``, so that a test reads what every pool process exported."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

FILE_VARIABLE = "MODELWORKERS_TEST_SPANS"


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """What a test asserts on, with ids in W3C hex."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else None,
        "attributes": {k: _plain(v) for k, v in (span.attributes or {}).items()},
        "links": [
            {
                "trace_id": f"{link.context.trace_id:032x}",
                "span_id": f"{link.context.span_id:016x}",
                "attributes": dict(link.attributes or {}),
            }
            for link in span.links
        ],
        "status": span.status.status_code.name,
        "resource": {k: _plain(v) for k, v in span.resource.attributes.items()},
        "pid": os.getpid(),
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class JsonLinesExporter(SpanExporter):
    """Appends one line per span to ``path``; one write per export, so processes that share
    the file do not interleave their lines."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(json.dumps(span_record(s)) + "\n" for s in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def exporter() -> SpanExporter:
    """The exporter TRACING names: it writes to the file ``MODELWORKERS_TEST_SPANS`` names."""
    return JsonLinesExporter(Path(os.environ[FILE_VARIABLE]))


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span exported to ``path`` so far."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
