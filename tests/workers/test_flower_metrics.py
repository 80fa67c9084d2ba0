"""Flower, started the project's way, shows the workers and the registry; metrics rise."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from harness import ROOT, WorkerProcess, close_app, wait_for
from tests.conftest import REPOSITORY
from workers.cli import flower_command, flower_env
from workers.embedded import free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_endpoint_exposes_per_model_counters_that_rise(start_worker: Start) -> None:
    port = free_port()
    worker = start_worker(
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY),
            "MODELWORKERS_METRICS_PORT": str(port),
        },
    )
    worker.wait_ready(2)
    url = f"http://127.0.0.1:{port}/metrics"
    before = httpx.get(url, timeout=5).text
    assert metric(before, "modelworkers_model_ready", model="sentiment", status="READY") == 2
    assert metric(before, "modelworkers_model_load_seconds", model="co2_prophet") > 0
    client = worker.app()
    for i in range(6):
        client.send_task("sentiment.analyze", args=[f"nice {i}"]).get(timeout=30)
    client.send_task("clustering.assign", args=[[[1.0, 2.0, 3.0, 4.0]]]).get(timeout=30)
    after = httpx.get(url, timeout=5).text
    calls = metric(after, "modelworkers_inference_total", model="sentiment")
    assert calls - metric(before, "modelworkers_inference_total", model="sentiment") == 6
    assert metric(after, "modelworkers_inference_seconds_count", model="sentiment") >= 6
    assert metric(after, "modelworkers_inference_total", model="customer_segments") >= 1
    assert re.search(r'modelworkers_inference_total\{model="sentiment",version="[^"]+"\}', after)
    close_app(client)


class OtherRows(HTMLParser):
    """The (name, value) rows of the 'Other' tab of Flower's worker page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_other = self._in_cell = False
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "div" and ("id", "tab-other") in attrs:
            self._in_other, self._depth = True, 0
        elif self._in_other and tag == "div":
            self._depth += 1
        elif self._in_other and tag == "tr":
            self.rows.append([])
        elif self._in_other and tag == "td":
            self._in_cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if self._in_other and tag == "div":
            if self._depth == 0:
                self._in_other = False
            self._depth -= 1
        elif tag == "td":
            self._in_cell = False

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.rows[-1][-1] += data


def test_flower_with_auth_shows_the_workers_and_the_model_registry(
    serving_worker: WorkerProcess, worker_logs: Path
) -> None:
    port = free_port()
    auth = ("admin", "s3cret-test")
    log = (worker_logs / "flower.log").open("wb")
    proc = subprocess.Popen(
        flower_command(port),
        cwd=ROOT,
        env=flower_env(serving_worker.env, ":".join(auth)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def workers() -> dict[str, Any] | None:
            try:
                r = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, auth=auth, timeout=10)
            except httpx.HTTPError:
                return None
            data = r.json() if r.status_code == 200 else {}
            node = data.get(serving_worker.node) or {}
            return data if node.get("stats", {}).get("model_registry.sentiment") else None

        data = wait_for(workers, 90, "Flower to list the worker with its registry", 0.5)
        stats = data[serving_worker.node]["stats"]
        models = serving_worker.snapshots()[0]["models"]
        summary = f"READY: 2/2 processes ready, {len(models)} models"
        assert stats["model_registry"] == summary
        assert stats["model_registry.sentiment"].startswith("READY 2/2 v1.0.0 calls ")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/", timeout=10).status_code == 401
        # the password is in Flower's environment, not on its command line (`ps` shows that)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert auth[1] not in cmdline and "basic-auth" not in cmdline

        # the worker page, as a browser fetches it: one row per model in the Other tab
        page = httpx.get(f"{base}/worker/{quote(serving_worker.node)}", auth=auth, timeout=30)
        assert page.status_code == 200, page.text[:500]
        parser = OtherRows()
        parser.feed(page.text)
        rows = {name.strip(): value.strip() for name, value in parser.rows}
        assert len(models) >= 5
        for name, meta in models.items():
            row = rows[f"model_registry.{name}"]
            assert row.startswith(f"{meta['status']} 2/2 v{meta['version']} calls "), row
            assert re.search(r" errors \d+", row), row
        assert rows["model_registry"] == summary
        registry_rows = {k: v for k, v in rows.items() if k.startswith("model_registry")}
        assert not any(value.startswith("{") for value in registry_rows.values()), rows

        # Task events are off by default (TASK_EVENTS: ~2 ms a task); Flower turns them on at
        # run time (enable_events broadcast), so it still sees the tasks while it watches.
        app = serving_worker.app()
        try:
            sent: list[str] = []

            def flower_saw_a_task() -> bool:
                result = app.send_task("sentiment.analyze", args=["a lovely film"])
                result.get(timeout=30)
                sent.append(result.id)
                r = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10)
                tasks = r.json() if r.status_code == 200 else {}
                return any(tasks.get(i, {}).get("state") == "SUCCESS" for i in sent)

            wait_for(flower_saw_a_task, 60, "Flower to see a task through its events", 0.5)
            # results carry no copy of the inputs (RESULT_EXTENDED off)
            meta = app.backend.get_task_meta(sent[-1])
            assert meta["status"] == "SUCCESS" and meta.get("args") is None
        finally:
            close_app(app)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
