"""Flower, started the project's way, shows the workers and the registry; metrics rise."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ROOT, WorkerProcess, close_app, wait_for
from tests.conftest import REPOSITORY
from workers.cli import flower_command
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
        concurrency=2, env={"MODEL_REPOSITORY": str(REPOSITORY), "METRICS_PORT": str(port)}
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


def test_flower_with_auth_shows_the_workers_and_the_model_registry(
    serving_worker: WorkerProcess, worker_logs: Path
) -> None:
    port = free_port()
    auth = ("admin", "s3cret-test")
    log = (worker_logs / "flower.log").open("wb")
    proc = subprocess.Popen(
        flower_command(port, ":".join(auth)),
        cwd=ROOT,
        env=serving_worker.env,
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
            return data if node.get("stats", {}).get("model_registry") else None

        data = wait_for(workers, 90, "Flower to list the worker with its registry", 0.5)
        registry = data[serving_worker.node]["stats"]["model_registry"]
        assert registry["processes"] == 2 and registry["ready"] is True
        assert registry["models"]["sentiment"].startswith("READY in 2/2")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert httpx.get(f"{base}/", timeout=10).status_code == 401

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
