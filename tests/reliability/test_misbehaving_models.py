"""Models that misbehave while serving: raise, break the batch contract, hang.

The families are in tests/support/families.py and are loaded by configuration (the manifest's
``implementation``), through the production registry, tasks and micro-batcher. Each misbehaves
only on texts with its trigger word, so the same worker then shows that it serves on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from harness import WorkerProcess, close_app, wait_for, write_manifest
from tests.workers.test_flower_metrics import metric
from workers.embedded import free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
FAMILIES = "tests.support.families"


def sentiment_manifest(folder: Path, cls: str, *, fallback: bool, **options: Any) -> Path:
    entries: list[dict[str, Any]] = [
        {
            "name": "sentiment",
            "family": "test",
            "implementation": f"{FAMILIES}:{cls}",
            "required": False,
            "fallback": "textblob" if fallback else "",
            **({"options": options} if options else {}),
        }
    ]
    if fallback:
        entries.append({"name": "textblob", "family": "textblob", "required": False})
    return write_manifest(folder, entries)


def outcome(app: Celery, task: str, arg: Any, timeout: float = 30) -> tuple[str, Any, float]:
    """(state, result or error text, seconds from sending to the stored result)."""
    t0 = time.monotonic()
    result = app.send_task(task, args=[arg])
    result.get(timeout=timeout, propagate=False)
    value = result.result
    if result.state == "FAILURE":
        value = f"{type(value).__name__}: {value}"
    return result.state, value, time.monotonic() - t0


def task_seconds(worker: WorkerProcess, task_id: str) -> float:
    """From ``Task NAME[ID] received`` to its outcome line, by the worker log's timestamps (the
    outcome line may follow the stored result by a moment: waited for, bounded)."""
    pattern = re.compile(
        r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] Task [\w.]+\[" + task_id
    )

    def both() -> list[str] | None:
        found: list[str] = pattern.findall(worker.log())
        return found if len(found) >= 2 else None

    stamps = wait_for(both, 10, f"the received and outcome lines of {task_id}")
    times = [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in stamps]
    assert len(times) == 2, (task_id, stamps)
    return (times[1] - times[0]).total_seconds()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_model_that_raises_is_answered_by_its_fallback_and_counted(
    start_worker: Start, tmp_path: Path, pool: str
) -> None:
    port = free_port()
    worker = start_worker(
        pool=pool,
        concurrency=2 if pool == "prefork" else 8,
        env={
            "MODELWORKERS_MODEL_MANIFEST": str(
                sentiment_manifest(tmp_path, "RaisingClassifier", fallback=True)
            ),
            "MODELWORKERS_METRICS_PORT": str(port),
        },
    )
    worker.wait_ready(2 if pool == "prefork" else 1)
    app = worker.app()
    try:
        state, answer, _ = outcome(app, "sentiment.analyze", "boom, said the model")
        assert state == "SUCCESS", answer
        assert answer["fallback"] is True and answer["model"] == "textblob"
        state, answer, _ = outcome(app, "sentiment.analyze", "a good day")
        assert state == "SUCCESS" and answer["fallback"] is False
        assert answer["model"] == "sentiment" and answer["label"] == "positive"
        state, answers, _ = outcome(app, "sentiment.analyze_batch", ["good", "boom"])
        assert state == "SUCCESS" and [a["fallback"] for a in answers] == [True, True]
    finally:
        close_app(app)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert metric(text, "modelworkers_fallback_answers_total", model="sentiment") == 2
    errors = metric(text, "modelworkers_inference_errors_total", model="sentiment", kind="error")
    assert errors == 2
    assert metric(text, "modelworkers_inference_failures_total", model="sentiment") == 2


def test_a_model_that_raises_without_a_fallback_fails_with_an_error_naming_it(
    start_worker: Start, tmp_path: Path
) -> None:
    manifest = sentiment_manifest(tmp_path, "RaisingClassifier", fallback=False)
    worker = start_worker(concurrency=1, env={"MODELWORKERS_MODEL_MANIFEST": str(manifest)})
    worker.wait_ready(1)
    app = worker.app()
    try:
        state, error, _ = outcome(app, "sentiment.analyze", "boom")
        assert state == "FAILURE"
        assert error == (
            "InferenceError: model 'sentiment'@1.0.0 failed: "
            "RuntimeError: the model's library failed on this batch"
        )
        assert outcome(app, "sentiment.analyze", "good")[0] == "SUCCESS"
    finally:
        close_app(app)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_batch_with_the_wrong_count_fails_at_once_and_the_next_batch_succeeds(
    start_worker: Start, tmp_path: Path, pool: str
) -> None:
    """Concurrent texts share batches (the threads pool's micro-batcher; prefork's pool
    batches). A batch answered with one result too many fails its requests within a second;
    the worker lives on and serves the next batch."""
    manifest = sentiment_manifest(tmp_path, "MiscountingClassifier", fallback=False)
    port = free_port()
    worker = start_worker(
        pool=pool,
        concurrency=16 if pool == "threads" else 2,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), "MODELWORKERS_METRICS_PORT": str(port)},
    )
    worker.wait_ready(1 if pool == "threads" else 2)
    app = worker.app()
    try:
        bad = [app.send_task("sentiment.analyze", args=[f"miscount {i}"]) for i in range(8)]
        for result in bad:
            result.get(timeout=10, propagate=False)
        # each failed within a second of the worker receiving it (its log's timestamps)
        for result in bad:
            assert task_seconds(worker, result.id) < 1.0
        errors = {f"{type(r.result).__name__}: {r.result}" for r in bad}
        assert all(r.state == "FAILURE" for r in bad)
        assert all(
            e.startswith("InferenceError: model 'sentiment'@1.0.0 failed: returned ")
            for e in errors
        ), errors
        good = [app.send_task("sentiment.analyze", args=[f"good {i}"]) for i in range(8)]
        assert [r.get(timeout=10)["label"] for r in good] == ["positive"] * 8
        state, answers, _ = outcome(app, "sentiment.analyze_batch", ["good", "fine"])
        assert state == "SUCCESS" and len(answers) == 2
    finally:
        close_app(app)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    bad_batches = metric(
        text, "modelworkers_inference_errors_total", model="sentiment", kind="bad_batch"
    )
    # threads: one per failed micro-batch; prefork: a failed pool batch reruns each of its
    # requests alone (one bad input fails only its own request), and each of those fails too
    assert (1 <= bad_batches <= 8) if pool == "threads" else (8 <= bad_batches <= 16), bad_batches
    assert worker.alive()
    if pool == "prefork":
        return
    snapshot = wait_for(
        lambda: [s for s in worker.snapshots() if "sentiment_batching" in s["stats"]],
        10,
        "the batcher's figures in the snapshot",
    )[0]
    stats = snapshot["stats"]["sentiment_batching"]
    assert stats["failed_batches"] >= 1 and stats["replaced_lanes"] == 0


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_hung_inference_fails_at_its_time_limit_and_the_next_request_is_served(
    start_worker: Start, tmp_path: Path, pool: str
) -> None:
    manifest = sentiment_manifest(
        tmp_path, "HangingClassifier", fallback=False, inference_timeout_s=1.0
    )
    port = free_port()
    worker = start_worker(
        pool=pool,
        concurrency=2 if pool != "solo" else 1,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), "MODELWORKERS_METRICS_PORT": str(port)},
    )
    worker.wait_ready(2 if pool == "prefork" else 1)
    app = worker.app()
    try:
        state, error, seconds = outcome(app, "sentiment.analyze", "hang on")
        assert state == "FAILURE"
        assert error == (
            "InferenceTimeout: model 'sentiment'@1.0.0 failed: "
            "no answer within its inference time limit of 1 s"
        )
        assert 1.0 <= seconds < 3.0
        state, answer, _ = outcome(app, "sentiment.analyze", "good")
        assert state == "SUCCESS" and answer["label"] == "positive"
    finally:
        close_app(app)
    assert worker.alive()
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    timeouts = metric(
        text, "modelworkers_inference_errors_total", model="sentiment", kind="timeout"
    )
    assert timeouts == 1
