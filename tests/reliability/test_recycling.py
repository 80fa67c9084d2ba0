"""Memory recycling: pool processes past WORKER_MAX_MEMORY_PER_CHILD_KB are replaced, and each
replacement has its models READY (loaded, or inherited from the parent and warmed, depending
on PRELOAD_MODE) before it takes a task; no task fails or is lost on the way.

The limit is 1 KiB, so every pool process retires after its first task (billiard checks the RSS
after each task): 30 tasks mean about 30 replacements, each of which must serve the manifest
(seg + the real ARIMA model + TextBlob) and publish a ready snapshot.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from harness import WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from shared.repository import load_repository
from tests.conftest import REPOSITORY
from tests.reliability.tools import (
    Tally,
    client_app,
    queue_drained,
    ready_pool_pids,
    wait_final,
)

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

TASKS = 30
UNLOADED = re.compile(r"model seg@[\w.]+ unloaded \[pid (\d+)\]")


def recycle_manifest(folder: Path) -> Path:
    real = load_repository(REPOSITORY).get("sunspots_arima")
    build_kmeans(folder / "seg.joblib")
    (folder / "arima.joblib").symlink_to(real.location)
    return write_manifest(
        folder,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
            {"name": "arima", "family": "arima", "path": "arima.joblib"},
            {"name": "textblob", "family": "textblob", "required": False},
        ],
    )


def test_pool_processes_over_the_memory_limit_are_replaced_and_reload(
    start_worker: Start, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    worker = start_worker(
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_MANIFEST": str(recycle_manifest(tmp_path)),
            "MODELWORKERS_WORKER_MAX_MEMORY_PER_CHILD_KB": "1",
        },
    )
    initial = {s["pid"] for s in worker.wait_ready(2, timeout=120)}
    app = client_app(redis_url, worker.queue)
    t0 = time.monotonic()
    ids = []
    for i in range(TASKS):
        if i % 2:
            ids.append(app.send_task("forecast.predict", args=["arima", 2]).id)
        else:
            row = [[float(i), 1.0, 2.0]]
            ids.append(app.send_task("clustering.assign", args=[row], kwargs={"model": "seg"}).id)
    results = wait_final(rclient, ids, 150, "every task while the pool recycles")
    wait_for(lambda: queue_drained(rclient, worker.queue), 30, "queue and unacked drained")

    def settled() -> list[dict[str, Any]] | None:
        children = worker.children_pids()
        snaps = [s for s in worker.snapshots() if s["node"] == worker.node]
        live = [s for s in snaps if s["pid"] in children and s["ready"]]
        return live if len(children) == 2 and len(live) == 2 else None

    snaps = wait_for(settled, 60, "2 ready replacement processes")
    log = worker.log()
    serving = ready_pool_pids(worker)
    tally = Tally.count(
        "memory recycling (1 KiB limit)",
        ids,
        results,
        [worker],
        t0,
        processes_ready=len(serving),
        replacements=len(serving) - 2,
        retired_cleanly=len(set(UNLOADED.findall(log))),
    )
    tally.report()
    close_app(app)

    assert tally.completed == TASKS and tally.failed == 0 and tally.lost == 0
    assert tally.redelivered == 0 and tally.duplicated == 0
    # (billiard's "exceeding memory limit" warning does not reach the log: count processes)
    assert len(serving) >= TASKS  # about one fresh process per task, each READY before serving
    assert {s["pid"] for s in snaps} <= serving
    assert len(set(UNLOADED.findall(log))) >= TASKS - 2  # retired through a clean shutdown
    assert "Timed out waiting for UP message" not in log
    assert not ({s["pid"] for s in snaps} & initial)
    assert all(m["status"] == "READY" for s in snaps for m in s["models"].values())
    # retired processes removed their own snapshot key on the way out
    live = set(worker.children_pids())
    stale = [
        s["pid"] for s in worker.snapshots() if s["node"] == worker.node and s["pid"] not in live
    ]
    assert stale == []
