"""Batching in the prefork pool (workers/poolbatch.py): requests that wait for a busy pool share
one pool job and one model call, yet each keeps its own result, error and acknowledgement; a
pool process killed in the middle of a batch loses none of its requests.

The model is ``RecordingClassifier`` (tests/support/families.py), loaded by configuration through
the production registry: it writes each call's pid and texts to a file before it answers, and
takes ``delay`` seconds, so that the test knows which batch runs where.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import WorkerProcess, close_app, wait_for, write_manifest

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]


def start_recording_worker(start_worker: Start, folder: Path, delay: float) -> WorkerProcess:
    record = folder / "calls.jsonl"
    manifest = write_manifest(
        folder,
        [
            {
                "name": "sentiment",
                "family": "test",
                "implementation": "tests.support.families:RecordingClassifier",
                "required": True,
                "options": {"record": str(record), "delay": delay},
            }
        ],
    )
    worker = start_worker(concurrency=2, env={"MODELWORKERS_MODEL_MANIFEST": str(manifest)})
    worker.wait_ready(2)
    return worker


def calls(folder: Path) -> list[dict[str, Any]]:
    """The model's calls so far (rehearsal calls left out)."""
    path = folder / "calls.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if not any(t.startswith("warm up") for t in r["texts"])]


def occupy_pool(app: Any, folder: Path) -> list[Any]:
    """Two slow requests, one per pool process, running when this returns."""
    blockers = [app.send_task("sentiment.analyze", [f"blocker {i} good"]) for i in range(2)]
    wait_for(
        lambda: sum(1 for c in calls(folder) if c["texts"][0].startswith("blocker")) == 2,
        30,
        "both pool processes busy",
    )
    return blockers


def expected_label(text: str) -> str:
    return "positive" if "good" in text else "negative"


def test_waiting_requests_share_a_pool_job_and_keep_their_own_results_and_errors(
    start_worker: Start, tmp_path: Path
) -> None:
    worker = start_recording_worker(start_worker, tmp_path, delay=0.5)
    app = worker.app()
    try:
        blockers = occupy_pool(app, tmp_path)
        valid = {f"text {i} {'good' if i % 2 else 'bad'}": None for i in range(24)}
        sent = []
        for i, text in enumerate(valid):
            if i % 3:
                sent.append((text, app.send_task("sentiment.analyze", [text])))
            else:
                sent.append((text, app.send_task("models.predict", ["sentiment", text])))
        invalid = {
            "text": app.send_task("sentiment.analyze", [123]),
            "inputs": app.send_task("models.predict", ["sentiment", 5]),
            "arguments": app.send_task("sentiment.analyze", ["one", "two"]),
            "texts": app.send_task("sentiment.analyze", kwargs={"texts": "wrong name"}),
        }
        for blocker in blockers:
            assert blocker.get(timeout=30)["label"] == "positive"
        for text, result in sent:
            answer = result.get(timeout=30)
            outputs = answer.get("outputs", answer)
            assert outputs["label"] == expected_label(text), (text, answer)
            assert answer["model"] == "sentiment" and answer["fallback"] is False
        for field, result in invalid.items():
            result.get(timeout=30, propagate=False)
            assert result.state == "FAILURE", field
            assert type(result.result).__name__ == "InvalidInput", (field, result.result)
            assert field in str(result.result), (field, result.result)

        seen = calls(tmp_path)
        batched = [c for c in seen if len(c["texts"]) > 1]
        assert batched, f"no model call answered more than one request: {seen}"
        answered = [t for c in seen for t in c["texts"] if t.startswith("text ")]
        assert sorted(answered) == sorted(valid), "every valid text answered exactly once"
        stats = app.control.inspect(destination=[worker.node], timeout=5).stats() or {}
        pool_batching = stats[worker.node]["pool_batching"]
        assert pool_batching["batches"] >= 1 and pool_batching["batched_requests"] >= 2
        assert worker.alive() and len(worker.wait_ready(2)) == 2
    finally:
        close_app(app)


def test_a_pool_process_killed_mid_batch_loses_none_of_its_requests(
    start_worker: Start, tmp_path: Path
) -> None:
    worker = start_recording_worker(start_worker, tmp_path, delay=1.0)
    app = worker.app()
    try:
        blockers = occupy_pool(app, tmp_path)
        texts = [f"text {i} {'good' if i % 2 else 'bad'}" for i in range(30)]
        results = {text: app.send_task("sentiment.analyze", [text]) for text in texts}

        batch = wait_for(
            lambda: next((c for c in calls(tmp_path) if len(c["texts"]) > 1), None),
            30,
            "a batch in a pool process",
        )
        os.kill(batch["pid"], signal.SIGKILL)
        killed_at = len(calls(tmp_path))

        for blocker in blockers:
            blocker.get(timeout=60)
        for text, result in results.items():
            answer = result.get(timeout=60)
            assert answer["label"] == expected_label(text), (text, answer)

        after = calls(tmp_path)[killed_at:]
        for text in batch["texts"]:
            again = [c for c in after if text in c["texts"]]
            assert again, f"{text!r} of the killed batch was not run again"
            assert all(len(c["texts"]) == 1 for c in again), (
                f"a redelivered request ran in a batch: {again}"
            )
        assert worker.alive()
        snapshots = worker.wait_ready(2)
        assert batch["pid"] not in {s["pid"] for s in snapshots}
        assert "SIGKILL" in worker.log()
    finally:
        close_app(app)


def test_a_redelivered_task_that_already_succeeded_is_acknowledged_without_running_again(
    start_worker: Start, tmp_path: Path
) -> None:
    """Its pool process died after it stored its result and before the acknowledgement (as the
    requests of a batch whose process dies late can): the redelivery must not run it again."""
    from tests.reliability.hostile import body, envelope, push, task_headers

    worker = start_recording_worker(start_worker, tmp_path, delay=0.0)
    app = worker.app()
    try:
        done_id, fresh_id = str(uuid.uuid4()), str(uuid.uuid4())
        app.backend.store_result(done_id, {"label": "stored before"}, "SUCCESS")
        for task_id, text in ((done_id, "text done good"), (fresh_id, "text fresh good")):
            raw = json.loads(
                envelope(
                    body([text]),
                    task_headers("sentiment.analyze", task_id, redelivered=True),
                    worker.queue,
                )
            )
            raw["properties"]["delivery_info"]["redelivered"] = True
            push(worker.client, worker.queue, json.dumps(raw).encode())
        assert app.AsyncResult(fresh_id).get(timeout=30)["label"] == "positive"
        assert app.AsyncResult(done_id).get(timeout=5) == {"label": "stored before"}
        texts = [t for c in calls(tmp_path) for t in c["texts"]]
        assert "text fresh good" in texts and "text done good" not in texts
        log = worker.log()
        assert f"Task sentiment.analyze[{done_id}] redelivered after it had succeeded" in log
        assert f"sentiment.analyze[{done_id}] received" not in log
        wait_for(
            lambda: worker.client.llen(worker.queue) == 0 and not worker.client.hlen("unacked"),
            10,
            "nothing left unacknowledged",
        )
    finally:
        close_app(app)
