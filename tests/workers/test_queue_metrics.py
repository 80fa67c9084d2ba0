"""Queue depth and oldest waiting message: on a node's metrics port and in `modelworkers status`,
for a burst sent before any worker consumes the queue, on each broker (Redis; RabbitMQ, where
only the depth is known)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from harness.brokers import Broker
from tests.workers.test_flower_metrics import metric
from workers.embedded import free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
BURST = 500


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_burst_raises_the_queue_depth_on_the_metrics_port_and_it_falls_back_to_zero(
    start_worker: Start, redis_url: str, worker_logs: Path, tmp_path: Path, broker: Broker
) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    manifest = write_manifest(
        tmp_path, [{"name": "seg", "family": "sklearn", "path": "seg.joblib", "version": "1"}]
    )
    port = free_port()
    # built, not started: its queue, prefix and environment are known before any consumer runs
    worker = WorkerProcess(
        redis_url,
        broker_url=broker.url(redis_url),
        concurrency=2,
        log_dir=worker_logs,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), "MODELWORKERS_METRICS_PORT": str(port)},
    )
    app = worker.app()
    try:
        results = [
            app.send_task(
                "clustering.assign", args=[[[0.1, 0.2, float(i)]]], kwargs={"model": "seg"}
            )
            for i in range(BURST)
        ]

        # nobody consumes yet: the CLI sees the burst, and its oldest message waiting
        def burst_seen() -> dict[str, Any] | None:
            # RabbitMQ may still be routing the last unconfirmed publishes: ask again
            first = json.loads(cli(worker.env, "status", "--json").stdout)
            return first if first["queues"][0]["depth"] == BURST else None

        first = wait_for(burst_seen, 30, f"{BURST} messages in the queue", 0.5)
        [entry] = first["queues"]
        assert (entry["queue"], entry["depth"]) == (worker.queue, BURST)
        amqp = broker.vhost is not None
        time.sleep(0 if amqp else 1.5)
        table = cli(worker.env, "status")
        assert f"queue {worker.queue}: {BURST} waiting, oldest waiting" in table.stdout, table
        again = json.loads(cli(worker.env, "status", "--json").stdout)
        if amqp:  # RabbitMQ cannot show the head message's age without taking it
            assert again["queues"][0]["oldest_age_seconds"] is None
            assert "oldest waiting not known (RabbitMQ)" in table.stdout
        else:
            assert again["queues"][0]["oldest_age_seconds"] >= 1.5

        # a worker with a metrics port: the depth is above 0 on it, then back to 0
        start_worker(
            redis_url=redis_url,
            broker_url=broker.url(redis_url),
            concurrency=2,
            prefix=worker.prefix,
            env={
                "MODELWORKERS_MODEL_MANIFEST": str(manifest),
                "MODELWORKERS_METRICS_PORT": str(port),
            },
        )
        url = f"http://127.0.0.1:{port}/metrics"
        depths: list[float] = []

        def scraped() -> str | None:
            try:
                text = httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                return None
            if "modelworkers_queue_depth" not in text:
                return None
            depths.append(metric(text, "modelworkers_queue_depth", queue=worker.queue))
            return text

        text = wait_for(scraped, 120, "the metrics port with the queue depth", 0.05)
        assert depths[0] > 0, depths
        oldest = f'modelworkers_queue_oldest_age_seconds{{queue="{worker.queue}"}}'
        assert (oldest in text) is not amqp
        for result in results:
            assert len(result.get(timeout=120)["labels"]) == 1

        def drained() -> bool:
            text = scraped()
            return text is not None and depths[-1] == 0

        wait_for(drained, 30, "the queue depth to fall back to 0", 0.2)
        assert max(depths) > 0 and depths[-1] == 0
        final = scraped()
        assert final is not None
        if not amqp:
            age = metric(final, "modelworkers_queue_oldest_age_seconds", queue=worker.queue)
            assert age == 0
    finally:
        close_app(app)
