"""Model load failures inside one worker: each model fails alone, with its reason, and the rest
of the process serves.

One pool process loads a manifest in which every entry is broken in its own way:

==========  ===========================================================================
seg         a good scikit-learn pipeline (serves)
arima       the real pre-fitted ARIMA model (serves)
textblob    the sentiment fallback (serves)
sentiment   the real transformers model, its weights truncated (sha256 mismatch) -> fallback
missing     artifact file absent
truncated   a pipeline cut to half its size after its sha256 was taken
tampered    an intact pipeline whose manifest sha256 is wrong
garbage     random bytes with a matching sha256 (the loader itself raises)
hang        a FIFO nobody writes to: reading it blocks past LOAD_TIMEOUT_SECONDS
co2         a Prophet model while ``import prophet`` raises ImportError (a directory on the
            worker's PYTHONPATH shadows the real package)
==========  ===========================================================================
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis

from harness import WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from shared.manifest import artifact_sha256, load_manifest
from shared.reload import collect_replies, send_reload
from shared.repository import load_repository
from tests.conftest import REPOSITORY
from tests.reliability.tools import Misbehaviour, Tally, client_app, meta_key, wait_final

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

LOAD_TIMEOUT = 3
FAST = 5.0  # a task needing a failed model must fail within this many seconds


def broken_manifest(folder: Path) -> Path:
    real = {s.name: s for s in load_repository(REPOSITORY).active()}
    build_kmeans(folder / "seg.joblib")
    (folder / "arima.joblib").symlink_to(real["sunspots_arima"].location)
    (folder / "co2.json").symlink_to(real["co2_prophet"].location)

    sentiment = folder / "sentiment"
    shutil.copytree(real["sentiment"].location, sentiment)
    weights = sentiment / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    build_kmeans(folder / "truncated.joblib")
    truncated_sha = artifact_sha256(folder / "truncated.joblib")
    data = (folder / "truncated.joblib").read_bytes()
    (folder / "truncated.joblib").write_bytes(data[: len(data) // 2])

    build_kmeans(folder / "tampered.joblib")
    (folder / "garbage.joblib").write_bytes(os.urandom(4096))
    os.mkfifo(folder / "hang.joblib")

    sk = {"family": "sklearn"}
    return write_manifest(
        folder,
        [
            {"name": "seg", **sk, "path": "seg.joblib"},
            {"name": "arima", "family": "arima", "path": "arima.joblib"},
            {"name": "textblob", "family": "textblob", "required": False},
            {
                "name": "sentiment",
                "family": "transformers",
                "path": "sentiment",
                "sha256": real["sentiment"].sha256,
                "required": False,
                "fallback": "textblob",
            },
            {"name": "missing", **sk, "path": "missing.joblib", "sha256": "0" * 64},
            {"name": "truncated", **sk, "path": "truncated.joblib", "sha256": truncated_sha},
            {"name": "tampered", **sk, "path": "tampered.joblib", "sha256": "e" * 64},
            {"name": "garbage", **sk, "path": "garbage.joblib"},  # sha256 of the garbage
            {"name": "hang", **sk, "path": "hang.joblib", "sha256": "0" * 64},
            {"name": "co2", "family": "prophet", "path": "co2.json"},
        ],
    )


def fake_prophet(folder: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import prophet`` fail like a missing
    optional dependency."""
    package = folder / "prophet"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise ImportError("No module named prophet (simulated)")\n'
    )
    return folder


def unblock(fifo: Path) -> None:
    """Let the hung load finish (a non-blocking writer opens and closes the FIFO: the reader
    sees EOF), so that the pool process can exit at the end of the test."""
    for _ in range(3):
        with suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def stored(client: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = client.get(meta_key(task_id))
    assert raw is not None
    result: dict[str, Any] = json.loads(raw)
    return result


# model -> (task, args, kwargs, substrings of the FAILED reason)
BROKEN: dict[str, tuple[str, list[Any], dict[str, Any], tuple[str, ...]]] = {
    "missing": ("clustering.assign", [[[0.0, 1.0, 2.0]]], {"model": "missing"}, ("missing",)),
    "truncated": (
        "clustering.assign",
        [[[0.0, 1.0, 2.0]]],
        {"model": "truncated"},
        ("ArtifactError", "sha256", "truncated"),
    ),
    "tampered": (
        "clustering.assign",
        [[[0.0, 1.0, 2.0]]],
        {"model": "tampered"},
        ("ArtifactError", "sha256"),
    ),
    "garbage": ("clustering.assign", [[[0.0, 1.0, 2.0]]], {"model": "garbage"}, ()),
    "hang": (
        "clustering.assign",
        [[[0.0, 1.0, 2.0]]],
        {"model": "hang"},
        ("LoadTimeout", f"within {LOAD_TIMEOUT} s"),
    ),
    "co2": ("forecast.predict", ["co2", 3], {}, ("ImportError", "(simulated)")),
}


def test_each_broken_model_fails_alone_with_its_reason_and_the_rest_serve(
    start_worker: Start, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    manifest = broken_manifest(tmp_path / "models")
    fifo = tmp_path / "models" / "hang.joblib"
    try:
        worker = start_worker(
            concurrency=1,
            env={
                "MODELWORKERS_MODEL_MANIFEST": str(manifest),
                "MODELWORKERS_LOAD_TIMEOUT_SECONDS": str(LOAD_TIMEOUT),
                # one thread per model: a slow one never queues others
                "MODELWORKERS_LOADER_THREADS": "12",
                "PYTHONPATH": str(fake_prophet(tmp_path / "shadow")),
            },
        )
        snap = worker.wait_ready(1, timeout=120, require_ready=False)[0]
        models = snap["models"]
        t0 = time.monotonic()

        # the registry in Redis says which model failed, and why
        assert snap["ready"] is False
        for name in ("seg", "arima", "textblob"):
            assert models[name]["status"] == "READY", (name, models[name]["error"])
        assert models["sentiment"]["status"] == "FAILED"
        assert "sha256" in models["sentiment"]["error"]
        for name, (_, _, _, reasons) in BROKEN.items():
            assert models[name]["status"] == "FAILED", (name, models[name])
            for reason in reasons:
                assert reason in models[name]["error"], (name, models[name]["error"])
        assert "sha256" not in models["garbage"]["error"]  # it passed the checksum, then failed
        assert "LoadTimeout" not in models["garbage"]["error"]
        not_ready = " ".join(snap["not_ready_reasons"])
        assert all(f"{name} is FAILED" in not_ready for name in BROKEN)
        assert "sentiment is" not in not_ready  # optional, and its fallback is READY
        assert "family prophet cannot be imported" in worker.log()

        app = client_app(redis_url, worker.queue)
        sent: list[str] = []
        failing: dict[str, tuple[str, float]] = {}
        for name, (task, args, kwargs, _) in BROKEN.items():
            started = time.monotonic()
            task_id = app.send_task(task, args=args, kwargs=kwargs).id
            wait_final(rclient, [task_id], FAST, f"the {name} task to fail")
            failing[name] = (task_id, time.monotonic() - started)
            sent.append(task_id)
        good = {
            "sentiment": app.send_task("sentiment.analyze", args=["what a lovely day"]).id,
            "seg": app.send_task(
                "clustering.assign", args=[[[0.0, 1.0, 2.0]]], kwargs={"model": "seg"}
            ).id,
            "arima": app.send_task("forecast.predict", args=["arima", 3]).id,
        }
        sent += list(good.values())
        results = wait_final(rclient, list(good.values()), 30, "the served tasks")
        tally = Tally.count(
            "model load failures",
            sent,
            {**results, **{i: stored(rclient, i) for i, _ in failing.values()}},
            [worker],
            t0,
            failed_fast_s={n: round(s, 2) for n, (_, s) in failing.items()},
            statuses={n: m["status"] for n, m in models.items()},
        )
        tally.report()
        close_app(app)

        for name, (task_id, seconds) in failing.items():
            meta = stored(rclient, task_id)
            assert meta["status"] == "FAILURE"
            assert meta["result"]["exc_type"] == "ModelNotReady", (name, meta["result"])
            message = meta["result"]["exc_message"][0]
            assert f"'{name}'" in message and "FAILED" in message, message
            assert seconds < FAST, (name, seconds)
        answer = results[good["sentiment"]]["result"]
        assert answer["fallback"] is True and answer["model"] == "textblob"
        assert answer["label"] == "positive"
        assert results[good["seg"]]["status"] == "SUCCESS"
        assert len(results[good["arima"]]["result"]["yhat"]) == 3
        assert tally.completed == len(good) and tally.failed == len(BROKEN)
        assert tally.lost == 0 and tally.redelivered == 0 and tally.duplicated == 0
        assert worker.alive() and len(worker.children_pids()) == 1
    finally:
        unblock(fifo)


def test_a_reload_during_a_hung_load_answers_and_the_heartbeat_goes_on(
    start_worker: Start, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    folder = tmp_path / "models"
    build_kmeans(folder / "seg.joblib")
    os.mkfifo(folder / "hang.joblib")
    manifest = write_manifest(
        folder,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
            {"name": "hang", "family": "sklearn", "path": "hang.joblib", "sha256": "0" * 64},
        ],
    )
    try:
        worker = start_worker(
            concurrency=1,
            env={
                "MODELWORKERS_MODEL_MANIFEST": str(manifest),
                "MODELWORKERS_LOAD_TIMEOUT_SECONDS": str(LOAD_TIMEOUT),
            },
        )
        snap = worker.wait_ready(1, timeout=120, require_ready=False)[0]
        assert "LoadTimeout" in snap["models"]["hang"]["error"]
        app = client_app(redis_url, worker.queue)
        t0 = time.monotonic()

        # an admin reloads every model (as `modelworkers reload --wait` does)
        request = send_reload(rclient, worker.prefix, load_manifest(manifest))
        sent_at = time.time()
        bound = LOAD_TIMEOUT + 10
        replies = collect_replies(rclient, worker.prefix, request, timeout=bound)
        answered = {r["pid"] for r in replies["replies"]}
        task_id = app.send_task(
            "clustering.assign", args=[[[0.0, 1.0, 2.0]]], kwargs={"model": "seg"}
        ).id
        served = wait_final(rclient, [task_id], 30, "a seg task")
        heartbeat_went_on = True
        try:  # the snapshot outlives its TTL (5 s here): the heartbeat still runs
            wait_for(
                lambda: any(s["heartbeat"] > sent_at + 6 for s in worker.snapshots()),
                15,
                "a heartbeat 6 s after the reload",
            )
        except TimeoutError:
            heartbeat_went_on = False
        Tally.count(
            "reload during a hung load",
            [task_id],
            served,
            [worker],
            t0,
            reload_answered=bool(answered),
            heartbeat_went_on=heartbeat_went_on,
            snapshots_left=len(worker.snapshots()),
        ).report()
        close_app(app)

        assert served[task_id]["status"] == "SUCCESS"  # serving goes on either way
        if replies["missing"] or answered != {snap["pid"]}:
            raise Misbehaviour(f"no reply to the reload within {bound} s: {replies}")
        if not heartbeat_went_on:
            raise Misbehaviour("the heartbeat stopped: the process left the registry")
        by_model = {r["model"]: r for r in replies["replies"][0]["results"]}
        assert by_model["seg"]["ok"] is True
        assert by_model["hang"]["ok"] is False and by_model["hang"]["error"]
    finally:
        unblock(folder / "hang.joblib")
