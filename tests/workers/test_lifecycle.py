"""Model lifecycle through real workers: unload and load, a memory budget, A/B splits, promote,
rollback and pinned versions.

Memory is measured on real scikit-learn models whose size the test controls: a
KNeighborsRegressor keeps its training rows, so one fitted on N float64 values holds N * 8 bytes.
The split tests use the Ridge family of test_plugins.py (a family written outside the project),
so that everything here is shown for a plugin family as well as for the built-ins.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from celery import Celery

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for
from shared.repository import ModelFile, VersionEntry, write_model_file
from tests.workers.test_plugins import FAMILY, build_ridge, rows
from workers.client import ModelClient

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
FEATURES = 10


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def knn(path: Path, megabytes: int, seed: int = 0) -> None:
    """A KNeighborsRegressor on random rows: about ``megabytes`` MiB of training data it keeps."""
    import joblib
    import numpy as np
    from sklearn.neighbors import KNeighborsRegressor

    n = megabytes * 2**20 // (8 * FEATURES)
    rng = np.random.default_rng(seed)
    x = rng.random((n, FEATURES))
    model = KNeighborsRegressor(n_neighbors=3, algorithm="brute").fit(x, rng.random(n))
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, path)


def add_model(repo: Path, name: str, files: dict[str, Path], **fields: Any) -> None:
    """``repo/name/model.toml`` listing ``files`` (version -> artifact in that folder)."""
    write_model_file(
        repo / name,
        ModelFile(
            **{"family": "sklearn", **fields},
            versions=[
                VersionEntry(version=v, path=p.name, sha256=sha256(p)) for v, p in files.items()
            ],
        ),
    )


def cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def pss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_full_info().pss) / 2**20


def statuses(worker: WorkerProcess, model: str) -> dict[int, dict[str, Any]]:
    return {s["pid"]: s["models"][model] for s in worker.snapshots() if s["node"] == worker.node}


class Stream:
    """Tasks of one kind sent back to back from a thread, each waited for; records every
    answer (or error) with the time it was sent."""

    def __init__(self, app: Celery, task: str, args: list[Any]) -> None:
        self.app, self.task, self.args = app, task, args
        self.answers: list[tuple[float, dict[str, Any]]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                result = self.app.send_task(self.task, args=self.args).get(timeout=30)
                self.answers.append((sent, result))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def test_unload_frees_the_model_everywhere_stays_unloaded_and_load_brings_it_back(
    start_worker: Start, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    knn(repo / "big" / "1.joblib", 80)
    add_model(repo, "big", {"1": repo / "big" / "1.joblib"})
    build_kmeans(repo / "seg" / "1.joblib")
    add_model(repo, "seg", {"1": repo / "seg" / "1.joblib"})
    worker = start_worker(
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(repo),
            "MODELWORKERS_PRELOAD_MODE": "child",
            "MODELWORKERS_LOADER_THREADS": "1",
        },
    )
    snaps = worker.wait_ready(2, timeout=120)
    measured = {s["pid"]: s["models"]["big"]["versions"]["1"]["memory_mb"] for s in snaps}
    assert all(m is not None and m > 70 for m in measured.values()), measured
    before = {pid: pss_mib(pid) for pid in measured}
    app = worker.app()
    try:
        with Stream(app, "clustering.assign", [[[0.1, 0.2, 0.3]], "seg"]) as stream:
            wait_for(lambda: len(stream.answers) >= 5, 30, "the stream on seg")
            done = cli(worker, "unload", "big", "--json")
            assert done.returncode == 0, done.stdout + done.stderr
            outcome = json.loads(done.stdout)
            assert {(r["node"], r["pid"]) for r in outcome["replies"]} == {
                (worker.node, pid) for pid in measured
            }
            for pid, drop in ((pid, before[pid] - pss_mib(pid)) for pid in measured):
                assert drop >= 0.8 * measured[pid], (pid, drop, measured[pid])
            assert all(
                m["status"] == "UNLOADED" and m["unloaded"]
                for m in statuses(worker, "big").values()
            )
            gone = app.send_task("models.predict", args=["big", [[0.0] * FEATURES]])
            gone.get(timeout=30, propagate=False)
            assert type(gone.result).__name__ == "ModelNotReady" and "unloaded" in str(gone.result)

            # a replacement pool process does not load it back
            victim = sorted(measured)[0]
            os.kill(victim, signal.SIGKILL)

            def replaced() -> list[dict[str, Any]] | None:
                live = set(worker.children_pids())
                snaps = [s for s in worker.snapshots() if s["pid"] in live and s["ready"]]
                pids = {s["pid"] for s in worker.snapshots()}
                # the killed process's snapshot has expired, and its replacement is ready
                return snaps if len(snaps) == 2 and pids == live and victim not in live else None

            new = [s for s in wait_for(replaced, 60, "a replacement") if s["pid"] not in measured]
            assert new[0]["models"]["big"]["status"] == "UNLOADED"
            assert new[0]["models"]["big"]["versions"]["1"]["memory_mb"] is None

            back = cli(worker, "load", "big", "--json")
            assert back.returncode == 0, back.stdout + back.stderr
            assert all(m["status"] == "READY" for m in statuses(worker, "big").values())
            answer = app.send_task("models.predict", args=["big", [[0.0] * FEATURES]])
            assert len(answer.get(timeout=30)["outputs"]["labels"]) == 1
        assert stream.errors == [] and len(stream.answers) > 10
    finally:
        close_app(app)


def test_a_memory_budget_evicts_the_least_recently_used_lazy_model_and_loads_it_again(
    start_worker: Start, tmp_path: Path
) -> None:
    """Three lazy models of about 40 MiB, a budget of 100 MiB that fits two."""
    repo = tmp_path / "repo"
    for seed, name in enumerate(("a", "b", "c")):
        knn(repo / name / "1.joblib", 40, seed)
        add_model(repo, name, {"1": repo / name / "1.joblib"}, lazy=True, required=False)
    build_kmeans(repo / "seg" / "1.joblib")
    add_model(repo, "seg", {"1": repo / "seg" / "1.joblib"})
    worker = start_worker(
        concurrency=1,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(repo),
            "MODELWORKERS_PRELOAD_MODE": "child",
            "MODELWORKERS_MODEL_MEMORY_BUDGET_MB": "100",
        },
    )
    (snap,) = worker.wait_ready(1)
    pid = snap["pid"]
    assert {snap["models"][n]["status"] for n in "abc"} == {"UNLOADED"}
    baseline = pss_mib(pid)
    app = worker.app()
    peaks = []
    try:
        for name in ["a", "b", "c", "a", "b", "c", "a"]:
            answer = app.send_task("models.predict", args=[name, [[0.5] * FEATURES]]).get(
                timeout=60
            )
            assert answer["model"] == name
            peaks.append(pss_mib(pid) - baseline)
        snap = wait_for(
            lambda: [s for s in worker.snapshots() if s["models"]["a"]["loads"] >= 3],
            10,
            "the snapshot after the last call",
        )[0]
    finally:
        close_app(app)
    assert max(peaks) <= 100 * 1.1, peaks
    loaded = [n for n in "abc" if snap["models"][n]["status"] == "READY"]
    assert sorted(loaded) == ["a", "c"]  # b was the least recently used when a came back
    assert [snap["models"][n]["loads"] for n in "abc"] == [3, 2, 2]
    assert [snap["models"][n]["evictions"] for n in "abc"] == [2, 2, 1]
    assert snap["models_memory_mb"] <= 100 and snap["memory_exact"] is True
    assert snap["models"]["seg"]["evictions"] == 0 and snap["models"]["seg"]["status"] == "READY"


def test_concurrent_first_requests_load_once_and_a_failing_lazy_load_runs_once_per_interval(
    start_worker: Start, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    build_kmeans(repo / "lazy" / "1.joblib")
    add_model(repo, "lazy", {"1": repo / "lazy" / "1.joblib"}, lazy=True, required=False)
    build_kmeans(repo / "broken" / "1.joblib")
    add_model(repo, "broken", {"1": repo / "broken" / "1.joblib"}, lazy=True, required=False)
    (repo / "broken" / "1.joblib").write_bytes(b"corrupt")  # its sha256 no longer matches
    worker = start_worker(
        pool="threads",
        concurrency=8,
        env={"MODELWORKERS_MODEL_REPOSITORY": str(repo), "MODELWORKERS_LAZY_RETRY_SECONDS": "3"},
    )
    worker.wait_ready(1)
    app = worker.app()
    try:
        first = [
            app.send_task("models.predict", args=["lazy", [[0.1, 0.2, 0.3]]]) for _ in range(8)
        ]
        assert all(r.get(timeout=60)["model"] == "lazy" for r in first)
        t0 = time.monotonic()
        broken = [
            app.send_task("models.predict", args=["broken", [[0.1, 0.2, 0.3]]]) for _ in range(8)
        ]
        for result in broken:
            result.get(timeout=60, propagate=False)
        assert {type(r.result).__name__ for r in broken} == {"ModelNotReady"}
        assert all("ArtifactError" in str(r.result) for r in broken)
        assert worker.log().count("model broken@1 (sklearn) LOADING") == 1  # not 8

        wait_for(lambda: time.monotonic() - t0 > 3.2, 5, "the retry interval", 0.1)
        again = [
            app.send_task("models.predict", args=["broken", [[0.1, 0.2, 0.3]]]) for _ in range(4)
        ]
        for result in again:
            result.get(timeout=60, propagate=False)
    finally:
        close_app(app)
    log = worker.log()
    assert log.count("model lazy@1 (sklearn) LOADING") == 1
    assert log.count("model broken@1 (sklearn) LOADING") == 2


def ridge_repository(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The plugin family's package and a repository with ridge versions 1, 2 (and 3, unused)."""
    src = root / "src" / "ridge_family"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text(FAMILY)
    repo = root / "repo"
    fitted = {
        v: build_ridge(repo / "ridge" / f"{v}.joblib", a)
        for v, a in (("1", 1.0), ("2", 0.05), ("3", 10.0))
    }
    add_model(
        repo,
        "ridge",
        {v: repo / "ridge" / f"{v}.joblib" for v in fitted},
        family="",
        implementation="ridge_family:RidgeRegressor",
    )
    return root / "src", repo, fitted


def test_splits_share_requests_by_weight_keys_stick_and_pins_are_honoured(
    start_worker: Start, tmp_path: Path
) -> None:
    src, repo, fitted = ridge_repository(tmp_path)
    worker = start_worker(
        concurrency=2, env={"MODELWORKERS_MODEL_REPOSITORY": str(repo), "PYTHONPATH": str(src)}
    )
    worker.wait_ready(2)
    done = cli(worker, "split", "ridge", "1=80", "2=20", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(
        {v: s["weight"] for v, s in m["versions"].items()} == {"1": 80, "2": 20}
        for m in statuses(worker, "ridge").values()
    )
    app = worker.app()
    x = rows()[:1]
    try:
        sent = [app.send_task("models.predict", args=["ridge", x]) for _ in range(1000)]
        versions = Counter(r.get(timeout=60)["version"] for r in sent)
        assert abs(versions["1"] / 1000 - 0.80) <= 0.04, versions
        # the same key, the same version, whichever process answers
        for user in (f"user-{i}" for i in range(40)):
            got = {
                app.send_task("models.predict", args=["ridge", x], kwargs={"key": user}).get(
                    timeout=30
                )["version"]
                for _ in range(5)
            }
            assert len(got) == 1, (user, got)
            if user in ("user-0", "user-1", "user-2"):  # the client's key= routes the same
                with ModelClient(
                    worker.redis_url, queue=worker.queue, key_prefix=worker.prefix, timeout=30
                ) as mc:
                    assert mc.predict("ridge", x, key=user).version in got, user
        # pins: answered by that version, or a clear error naming it
        pinned = app.send_task("models.predict", args=["ridge", x], kwargs={"version": "2"})
        answer = pinned.get(timeout=30)
        assert answer["version"] == "2"
        assert answer["outputs"]["values"] == pytest.approx(fitted["2"].predict(x).tolist())
        missing = app.send_task("models.predict", args=["ridge", x], kwargs={"version": "3"})
        missing.get(timeout=30, propagate=False)
        assert type(missing.result).__name__ == "ModelNotReady"
        assert "version '3' is not loaded" in str(missing.result)

        # promote under a stream of 200 tasks: none fails, and after it only version 2 answers
        with Stream(app, "models.predict", ["ridge", x]) as stream:
            wait_for(lambda: len(stream.answers) >= 50, 60, "tasks before the promote")
            promoted = cli(worker, "promote", "ridge", "2", "--json")
            after = time.monotonic()

            def enough() -> bool:
                later = [a for sent_at, a in stream.answers if sent_at > after]
                return len(stream.answers) >= 200 and len(later) >= 20

            wait_for(enough, 120, "200 tasks, 20 of them sent after the promote")
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr
        assert stream.errors == []
        assert {a["version"] for sent_at, a in stream.answers if sent_at > after} == {"2"}
        assert all(
            set(m["versions"]) == {"2"} and m["versions"]["2"]["weight"] == 100
            for m in statuses(worker, "ridge").values()
        )
        # rollback: the split comes back
        back = cli(worker, "rollback", "ridge", "--json")
        assert back.returncode == 0, back.stdout + back.stderr
        assert all(
            {v: s["weight"] for v, s in m["versions"].items() if s["weight"]} == {"1": 80, "2": 20}
            for m in statuses(worker, "ridge").values()
        )
        # unload and load, as for a built-in family
        gone = cli(worker, "unload", "ridge", "--json")
        assert gone.returncode == 0, gone.stdout + gone.stderr
        assert {m["status"] for m in statuses(worker, "ridge").values()} == {"UNLOADED"}
        refused = app.send_task("models.predict", args=["ridge", x])
        refused.get(timeout=30, propagate=False)
        assert type(refused.result).__name__ == "ModelNotReady", refused.result
        back = cli(worker, "load", "ridge", "--version", "1", "--json")
        assert back.returncode == 0, back.stdout + back.stderr
        answer = app.send_task("models.predict", args=["ridge", x]).get(timeout=30)
        assert answer["version"] == "1"
        assert answer["outputs"]["values"] == pytest.approx(fitted["1"].predict(x).tolist())
    finally:
        close_app(app)
