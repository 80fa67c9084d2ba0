"""Worker processes: preloading per pool type, replacement children, state in Redis, failures."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from shared.repository import load_repository
from tests.conftest import REPOSITORY
from tests.tasks.test_contract import stored_error

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]


def toy_manifest(
    folder: Path, *, sentiment_sha: str | None = None, ghost_required: bool = False
) -> Path:
    """seg (sklearn) + the real sentiment model (optionally with a wrong sha) + textblob."""
    build_kmeans(folder / "seg.joblib")
    real = load_repository(REPOSITORY).get("sentiment")
    (folder / "sentiment").symlink_to(Path(real.location), target_is_directory=True)
    entries: list[dict[str, Any]] = [
        {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
        {
            "name": "sentiment",
            "family": "transformers",
            "path": "sentiment",
            "required": False,
            "fallback": "textblob",
            "sha256": sentiment_sha or real.sha256,
        },
        {"name": "textblob", "family": "textblob", "required": False},
    ]
    if ghost_required:
        entries.append(
            {"name": "ghost", "family": "sklearn", "path": "ghost.joblib", "sha256": "0" * 64}
        )
    return write_manifest(folder, entries)


def test_every_pool_process_publishes_its_own_state_with_a_ttl(
    serving_worker: WorkerProcess,
) -> None:
    snaps = serving_worker.wait_ready(2)
    children = set(serving_worker.children_pids())
    assert {s["pid"] for s in snaps} == children and len(children) == 2
    for snap in snaps:
        key = f"{serving_worker.prefix}:proc:{snap['host']}:{snap['pid']}"
        ttl = serving_worker.client.ttl(key)
        assert 0 < ttl <= 5
        assert snap["models"]["sentiment"]["status"] == "READY"
        assert snap["models"]["sentiment"]["load_seconds"] > 0
    # the heartbeat refreshes the snapshot
    before = {s["pid"]: s["heartbeat"] for s in snaps}
    wait_for(
        lambda: all(s["heartbeat"] > before[s["pid"]] for s in serving_worker.snapshots()),
        10,
        "a newer heartbeat from every process",
    )


def test_replacement_children_load_their_models_and_are_not_killed(start_worker: Start) -> None:
    worker = start_worker(
        concurrency=1,
        extra_args=["--max-tasks-per-child", "1"],
        env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)},
    )
    first = worker.wait_ready(1)[0]["pid"]
    client = worker.app()
    seen = set()
    for i in range(3):  # each task retires its child; the next one needs a fresh, loaded child
        result = client.send_task("sentiment.analyze", args=[f"great product number {i}"])
        assert result.get(timeout=90)["fallback"] is False
        seen.add(result.get()["model"])
        wait_for(
            lambda: worker.children_pids() and first not in worker.children_pids(),
            60,
            "the child to be replaced",
        )
    new = worker.wait_ready(1)
    assert all(s["pid"] != first for s in new if s["pid"] in worker.children_pids())
    log = worker.log()
    assert "Timed out waiting for UP message" not in log
    assert log.count("registry of pid") >= 3  # the first child and its replacements loaded
    close_app(client)


def test_first_tasks_after_ready_are_fast_and_warm_ones_faster(start_worker: Start) -> None:
    """The seed's floors, as checks: first task after READY < 2 s, warm tasks < 100 ms."""
    worker = start_worker(concurrency=1, env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)})
    worker.wait_ready(1)
    client = worker.app()
    jobs = [
        ("sentiment.analyze", ["I really enjoyed this"]),
        ("forecast.predict", ["co2_prophet", 3]),
        ("forecast.predict", ["sunspots_arima", 3]),
        ("clustering.assign", [[[10.0, 5.0, 300.0, 12.0]]]),
    ]
    for name, args in jobs:
        t0 = time.perf_counter()
        client.send_task(name, args=args).get(timeout=30)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(5):
            t0 = time.perf_counter()
            client.send_task(name, args=args).get(timeout=30)
            warm.append(time.perf_counter() - t0)
        assert first < 2.0, f"first {name} took {first:.3f} s"
        assert sorted(warm)[2] < 0.1, f"warm {name} median {sorted(warm)[2]:.3f} s"
    close_app(client)


def test_failed_models_are_reported_and_the_fallback_and_others_serve(
    start_worker: Start, tmp_path: Path
) -> None:
    manifest = toy_manifest(tmp_path, sentiment_sha="f" * 64, ghost_required=True)
    worker = start_worker(concurrency=1, env={"MODELWORKERS_MODEL_MANIFEST": str(manifest)})
    snap = worker.wait_ready(1, require_ready=False)[0]
    assert snap["ready"] is False
    assert snap["models"]["sentiment"]["status"] == "FAILED"
    assert "sha256" in snap["models"]["sentiment"]["error"]
    assert snap["models"]["ghost"]["status"] == "FAILED"
    assert any(r.startswith("ghost is FAILED") for r in snap["not_ready_reasons"])
    client = worker.app()
    answer = client.send_task("sentiment.analyze", args=["what a lovely day"]).get(timeout=30)
    assert answer["fallback"] is True and answer["model"] == "textblob"
    assert answer["label"] == "positive"
    assert client.send_task(
        "clustering.assign", args=[[[0.0, 1.0, 2.0]]], kwargs={"model": "seg"}
    ).get(timeout=30)["labels"]
    result = client.send_task("clustering.assign", args=[[[0.0]]], kwargs={"model": "ghost"})
    t0 = time.perf_counter()
    result.get(timeout=30, propagate=False)
    assert time.perf_counter() - t0 < 5
    exc_type, message = stored_error(result)
    assert exc_type == "ModelNotReady" and "ghost" in message and "FAILED" in message
    close_app(client)


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_threads_and_solo_pools_preload_too(start_worker: Start, tmp_path: Path, pool: str) -> None:
    manifest = toy_manifest(tmp_path)
    worker = start_worker(
        pool=pool,
        concurrency=2 if pool == "threads" else 1,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest)},
    )
    snaps = worker.wait_ready(1)
    assert len(snaps) == 1 and snaps[0]["pid"] == worker.pid  # the main process serves
    assert snaps[0]["models"]["sentiment"]["status"] == "READY"
    client = worker.app()
    texts = ["good", "bad", "great", "awful"]
    results = [client.send_task("sentiment.analyze", args=[t]) for t in texts]
    assert [r.get(timeout=30)["fallback"] for r in results] == [False] * 4
    close_app(client)


def test_a_pickled_message_is_refused_and_never_run(serving_worker: WorkerProcess) -> None:
    client = serving_worker.app()
    client.conf.accept_content = ["json", "pickle"]
    result = client.send_task("clustering.fit", args=[[[0.0], [1.0]], 2], serializer="pickle")
    result.get(timeout=20, propagate=False)
    assert result.state == "FAILURE"
    assert type(result.result).__name__ == "InvalidMessage"
    assert "content type 'application/x-python-serialize' is not accepted" in str(result.result)
    log = serving_worker.log()
    assert f"refused clustering.fit[{result.id}] by the consumer" in log
    assert f"clustering.fit[{result.id}] received" not in log  # never handed to a pool process
    close_app(client)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_copy_on_write_mode_loads_once_in_the_parent_and_children_serve(
    start_worker: Start, backend: str
) -> None:
    """On either backend of the transformers models (TRANSFORMERS_BACKEND): torch computes
    after fork without hanging; ONNX Runtime's sessions, dropped by the parent, are opened
    again in each child."""
    from transformers import pipeline

    env = {"MODELWORKERS_PRELOAD_MODE": "parent", "MODELWORKERS_TRANSFORMERS_BACKEND": backend}
    worker = start_worker(
        concurrency=2, env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY), **env}
    )
    snaps = worker.wait_ready(2)
    assert {s["models"]["sentiment"]["details"]["backend"] for s in snaps} == {backend}
    assert "models loaded in the parent (copy-on-write mode)" in worker.log()
    loaded = {s["pid"]: s["models"]["sentiment"]["loaded_at"] for s in snaps}
    assert len(set(loaded.values())) == 1  # one load, inherited by both children
    assert all(s["models"]["sentiment"]["loaded_at"] < s["started_at"] for s in snaps)
    spec = load_repository(REPOSITORY).get("sentiment")
    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    client = worker.app()
    for text in ["a wonderful, moving film", "a dull and tiresome mess"]:
        # children run their backend after fork without hanging, and answer like the library
        got = client.send_task("sentiment.analyze", args=[text]).get(timeout=30)
        want = pipe(text)[0]
        assert got["label"] == want["label"].lower()
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    # the fork-safe families warmed up once, in the parent (WARM_BEFORE_FORK), and the children
    # answer with them: a Prophet and an ARIMA forecast, and a Stan fit
    found = re.search(r"warmed before fork, shared by every pool process: (.+) \(", worker.log())
    assert found, "no 'warmed before fork' line in the worker log"
    warmed = set(found.group(1).split(", "))
    assert {"co2_prophet", "sunspots_arima", "textblob"} == warmed  # not sentiment, not sklearn
    for model in ("co2_prophet", "sunspots_arima"):
        got = client.send_task("forecast.predict", args=[model, 3]).get(timeout=30)
        assert len(got["yhat"]) == 3 and got["yhat_lower"][0] <= got["yhat"][0]
    fit = client.send_task(
        "forecast.prophet",
        args=[
            {"ds": [f"2024-01-{d:02d}" for d in range(1, 22)], "y": [d % 7 for d in range(21)]},
            2,
        ],
    ).get(timeout=60)
    assert len(fit["yhat"]) == 2
    close_app(client)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: nothing to borrow")
@pytest.mark.parametrize("borrow", [True, False], ids=["borrow", "own-core-only"])
def test_a_lone_batch_runs_on_the_idle_pool_process_core_too(
    start_worker: Start, borrow: bool
) -> None:
    """The default worker on a CPU (prefork -c 2, ONNX Runtime, one thread per pool process): a
    lone analyze_batch of 16 texts runs in parts on threads its pool process adds (two: its own
    core and the idle sibling's), with the answers of single requests; with
    MODELWORKERS_BORROW_IDLE_CORES=false it stays on the process's one thread."""
    env = {
        "MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY),
        "MODELWORKERS_TRANSFORMERS_BACKEND": "onnx",
        "MODELWORKERS_BORROW_IDLE_CORES": str(borrow).lower(),
    }
    worker = start_worker(concurrency=2, env=env)
    worker.wait_ready(2)
    children = worker.children_pids()

    def threads() -> dict[int, int]:
        return {pid: len(os.listdir(f"/proc/{pid}/task")) for pid in children}

    before = threads()
    client = worker.app()
    texts = [f"review {i}: " + ("a wonderful, moving film" if i % 2 else "dull") for i in range(16)]
    got = client.send_task("sentiment.analyze_batch", args=[texts]).get(timeout=60)
    alone = [client.send_task("sentiment.analyze", args=[t]).get(timeout=30) for t in texts[:4]]
    close_app(client)
    assert [g["label"] for g in got[:4]] == [a["label"] for a in alone]
    assert [g["score"] for g in got[:4]] == pytest.approx([a["score"] for a in alone], abs=1e-4)
    grown = max(after - before[pid] for pid, after in threads().items())
    assert grown >= 2 if borrow else grown < 2, (before, threads())


def test_auto_preload_mode_is_copy_on_write_without_a_gpu(serving_worker: WorkerProcess) -> None:
    assert "models loaded in the parent (copy-on-write mode)" in serving_worker.log()


def test_threads_pool_batches_concurrent_requests_into_shared_forward_passes(
    start_worker: Start, tmp_path: Path
) -> None:
    worker = start_worker(
        pool="threads",
        concurrency=16,
        env={"MODELWORKERS_MODEL_MANIFEST": str(toy_manifest(tmp_path))},
    )
    worker.wait_ready(1)
    client = worker.app()
    texts = [f"review {i}: {'great' if i % 2 else 'awful'} film" for i in range(64)]
    pending = [client.send_task("sentiment.analyze", args=[t]) for t in texts]
    got = [p.get(timeout=60) for p in pending]
    batch = client.send_task("sentiment.analyze_batch", args=[texts]).get(timeout=60)
    assert [g["label"] for g in got] == [b["label"] for b in batch]
    for g, b in zip(got, batch, strict=True):
        assert g["score"] == pytest.approx(b["score"], abs=1e-4)
    stats = client.send_task("control.publish_state").get(timeout=30)["stats"]
    batching = stats["sentiment_batching"]
    cores = len(os.sched_getaffinity(0))
    assert f"(torch threads {cores})" in worker.log()  # one process: all cores
    lanes = 2 if cores >= 2 else 1  # BATCH_LANES=0 (auto) on a CPU
    assert batching["lanes"] == lanes
    # with two lanes analyze_batch went through them too: 64 single texts + 64 in one task
    items = 128 if lanes > 1 else 64
    assert batching["items"] == items and batching["batches"] < items and batching["largest"] > 1
    assert (
        f"sentiment micro-batcher: {lanes} lane(s) x {max(1, cores // lanes)} torch thread(s)"
        in worker.log()
    )
    close_app(client)


def test_a_cached_hub_model_serves_sentiment_by_configuration_alone(
    start_worker: Start, tmp_path: Path
) -> None:
    """SENTIMENT_MODEL=org/name, found offline in the Hugging Face cache under MODEL_CACHE_DIR."""
    import shutil

    real = load_repository(REPOSITORY).get("sentiment", "1.1.0")
    repo = tmp_path / "cache" / "hub" / "models--local--tiny-sentiment"
    shutil.copytree(real.location, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    worker = start_worker(
        concurrency=1,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY),
            "MODELWORKERS_MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "MODELWORKERS_SENTIMENT_MODEL": "local/tiny-sentiment",
            "HF_HOME": "",
        },
    )
    snap = worker.wait_ready(1)[0]
    assert snap["models"]["sentiment"]["version"] == "1.0.0+override"
    client = worker.app()
    got = client.send_task("sentiment.analyze", args=["a moving, beautiful film"]).get(timeout=30)
    assert got["fallback"] is False and got["label"] == "positive"
    close_app(client)


@pytest.mark.parametrize("target", ["workers", "workers.app"])
def test_celery_finds_the_app_by_package_or_module(start_worker: Start, target: str) -> None:
    """``celery -A workers worker`` (Celery's usual form) and ``-A workers.app`` both serve."""
    worker = start_worker(concurrency=1, env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)})
    worker.stop()
    worker.args[worker.args.index("workers.app")] = target
    worker.start().wait_ready(1, timeout=120)
    client = worker.app()
    assert client.send_task("sentiment.analyze", args=["a fine day"]).get(timeout=30)["label"]
    close_app(client)


def test_an_idle_pool_process_hands_back_the_memory_a_large_batch_freed(
    serving_worker: WorkerProcess, client: Any
) -> None:
    """A large batch leaves megabytes of freed heap in the pool process that ran it (glibc keeps
    up to twice the largest block freed); at its next heartbeat after the task, with nothing
    running, the process hands them back, and its snapshot says how much (stats["heap"])."""

    def handed_back() -> dict[int, float]:
        snaps = [s for s in serving_worker.snapshots() if s.get("node") == serving_worker.node]
        return {s["pid"]: s["stats"].get("heap", {}).get("handed_back_mib", 0.0) for s in snaps}

    before = handed_back()
    assert before and len(before) == 2, before
    long_texts = [f"review {i}: " + "a long and winding, wonderful film " * 30 for i in range(32)]
    for _ in range(2):  # the first batch's blocks are mapped and unmapped; the second's stay
        got = client.send_task("sentiment.analyze_batch", args=[long_texts]).get(timeout=60)
        assert len(got) == 32

    def grown() -> dict[int, float]:
        now = handed_back()
        return {
            p: mib - before.get(p, 0.0) for p, mib in now.items() if mib - before.get(p, 0.0) >= 4
        }

    assert wait_for(grown, 30, "a pool process handing back freed heap memory"), handed_back()


def test_copy_on_write_pool_processes_inherit_the_parents_thread_limits(
    start_worker: Start,
) -> None:
    """Prefork -c 2, models loaded in the parent: the parent limits the BLAS and OpenMP thread
    pools before fork, and every pool process runs with one thread each, torch included."""
    worker = start_worker(
        concurrency=2,
        env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)},
        extra_args=["-I", "tests.support.probe_tasks"],
    )
    worker.wait_ready(2)
    assert "models loaded in the parent (copy-on-write mode)" in worker.log()
    client = worker.app()
    seen: dict[int, dict[str, Any]] = {}

    def both() -> bool:
        pending = [client.send_task("tests.thread_limits") for _ in range(4)]
        for answer in (p.get(timeout=30) for p in pending):
            seen[answer["pid"]] = answer
        return len(seen) == 2

    try:
        assert wait_for(both, 60, "an answer from each pool process"), seen
    finally:
        close_app(client)
    for answer in seen.values():
        assert answer["torch"] == 1, answer
        assert answer["pools"] and set(answer["pools"].values()) == {1}, answer
