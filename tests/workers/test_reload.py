"""Fleet-wide reload: two nodes of two pool processes each, on real Redis, under a task stream."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from shared.repository import load_repository
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]


def versioned_manifest(folder: Path) -> Path:
    """sentiment 1.0.0 (active), 1.1.0 (real, trained) and 9.9.9-broken (truncated weights whose
    sha256 matches the manifest: the checksum passes, the load fails)."""
    real = load_repository(REPOSITORY)
    for version in ("1.0.0", "1.1.0"):
        shutil.copytree(real.get("sentiment", version).location, folder / f"s-{version}")
    broken = folder / "s-9.9.9-broken"
    shutil.copytree(folder / "s-1.0.0", broken)
    weights = [*broken.glob("*.safetensors"), *broken.glob("*.onnx")]
    assert weights, f"no weights in {broken}"
    for file in weights:  # each backend (torch, ONNX Runtime) reads its own file
        file.write_bytes(file.read_bytes()[:1000])
    build_kmeans(folder / "seg.joblib")
    return write_manifest(
        folder,
        [
            {
                "name": "sentiment",
                "family": "transformers",
                "path": "s-1.0.0",
                "version": "1.0.0",
                "required": False,
                "fallback": "textblob",
                "active": True,
            },
            {
                "name": "sentiment",
                "family": "transformers",
                "path": "s-1.1.0",
                "version": "1.1.0",
                "required": False,
                "fallback": "textblob",
            },
            {
                "name": "sentiment",
                "family": "transformers",
                "path": "s-9.9.9-broken",
                "version": "9.9.9-broken",
                "required": False,
                "fallback": "textblob",
            },
            {"name": "textblob", "family": "textblob", "required": False},
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
        ],
    )


@pytest.fixture
def fleet(start_worker: Start, tmp_path: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    manifest = versioned_manifest(tmp_path)
    prefix = f"mwfleet-{uuid.uuid4().hex[:6]}"
    env = {"MODELWORKERS_MODEL_MANIFEST": str(manifest)}
    nodes = tuple(
        start_worker(concurrency=2, prefix=prefix, node=f"{name}@{prefix}", env=env)
        for name in ("alpha", "beta")
    )
    for node in nodes:
        node.wait_ready(2)
    yield nodes  # type: ignore[misc]


def cli(
    worker: WorkerProcess, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**worker.env}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Stream:
    """Sends sentiment.analyze tasks back to back until stopped; records every outcome."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.app = worker.app()
        self.results: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            pending = [
                self.app.send_task("sentiment.analyze", args=[f"a great film {i + k}"])
                for k in range(4)
            ]
            i += 4
            for result in pending:
                try:
                    self.results.append(result.get(timeout=60))
                except Exception as exc:  # reported by the test
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Stream:
        self.thread.start()
        wait_for(lambda: len(self.results) >= 8, 30, "the stream to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=90)
        close_app(self.app)


def versions(worker: WorkerProcess) -> list[str]:
    return [s["models"]["sentiment"]["version"] for s in worker.snapshots()]


def test_reload_reaches_all_four_processes_while_a_task_stream_keeps_succeeding(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, beta = fleet
    with Stream(alpha) as stream:
        done = cli(alpha, "reload", "sentiment", "--version", "1.1.0", "--wait", "--json")
        served_during = len(stream.results)
        wait_for(lambda: len(stream.results) >= served_during + 8, 30, "tasks after the reload")
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    pids = {(r["node"], r["pid"]) for r in outcome["replies"]}
    assert len(pids) == 4 and outcome["missing"] == []
    assert {node for node, _ in pids} == {alpha.node, beta.node}
    for reply in outcome["replies"]:
        (result,) = reply["results"]
        assert result["ok"] and result["old_version"] == "1.0.0"
        assert result["new_version"] == "1.1.0" and result["seconds"] > 0
    assert stream.errors == []
    assert all(not r["fallback"] for r in stream.results)
    assert {r["version"] for r in stream.results} == {"1.0.0", "1.1.0"}
    wait_for(lambda: versions(alpha) == ["1.1.0"] * 4, 10, "status to show 1.1.0 everywhere")
    status = cli(alpha, "status", "--json")
    processes = json.loads(status.stdout)["processes"]
    assert [p["models"]["sentiment"]["version"] for p in processes] == ["1.1.0"] * 4
    # A process started after the reload (a replacement child) loads the new version.
    victim = alpha.children_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(alpha.children_pids()) == 2 and victim not in alpha.children_pids(),
        30,
        "a replacement child",
    )
    old_pids = {p for _, p in pids}
    fresh = wait_for(
        lambda: [s for s in alpha.snapshots() if s["pid"] not in old_pids and s["ready"]],
        60,
        "the replacement child's snapshot",
    )
    assert [s["models"]["sentiment"]["version"] for s in fresh] == ["1.1.0"]


def test_a_reload_to_a_corrupt_artifact_fails_everywhere_and_the_old_version_serves(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, _ = fleet
    done = cli(alpha, "reload", "sentiment", "--version", "9.9.9-broken", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    assert len(outcome["replies"]) == 4
    for reply in outcome["replies"]:
        (result,) = reply["results"]
        assert not result["ok"] and result["error"] and result["old_version"] == "1.0.0"
    client = alpha.app()
    answers = [
        client.send_task("sentiment.analyze", args=["lovely"]).get(timeout=30) for _ in range(6)
    ]
    assert {(a["version"], a["fallback"]) for a in answers} == {("1.0.0", False)}
    close_app(client)
    snaps = alpha.snapshots()
    assert all(s["models"]["sentiment"]["reload_error"] for s in snaps)
    # the broken version is not left as the fleet's desired version
    desired = alpha.client.hgetall(f"{alpha.prefix}:desired")
    assert desired.get(b"sentiment") in (None, b"1.0.0")


def test_reload_refuses_unknown_models_versions_and_paths(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, _ = fleet
    for args, needle in [
        (["nope"], "'nope' is not in the manifest"),
        (["sentiment", "--version", "7.0"], "no version '7.0'"),
        (["/etc/passwd"], "not paths"),
    ]:
        done = cli(alpha, "reload", *args)
        assert done.returncode == 2 and needle in done.stderr, done.stderr


def test_celery_broadcast_reloads_only_the_named_node(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, beta = fleet
    app = alpha.app()
    replies = app.control.broadcast(
        "reload_models",
        arguments={"model": "sentiment", "version": "1.1.0"},
        destination=[beta.node],
        reply=True,
        timeout=10,
    )
    assert len(replies) == 1 and beta.node in replies[0]
    answer = replies[0][beta.node]["ok"]
    assert answer["processes"] == 2
    key = f"{alpha.prefix}:reload:{answer['request_id']}"
    wait_for(lambda: alpha.client.llen(key) == 2, 60, "both beta processes to reply")
    wait_for(
        lambda: sorted(versions(alpha)) == ["1.0.0", "1.0.0", "1.1.0", "1.1.0"],
        10,
        "beta on 1.1.0, alpha still on 1.0.0",
    )
    by_node = {s["node"]: s["models"]["sentiment"]["version"] for s in alpha.snapshots()}
    assert by_node == {alpha.node: "1.0.0", beta.node: "1.1.0"}
    bad = app.control.broadcast(
        "reload_models",
        arguments={"model": "../x"},
        destination=[beta.node],
        reply=True,
        timeout=10,
    )
    assert "error" in bad[0][beta.node] and "not paths" in bad[0][beta.node]["error"]
    close_app(app)


def test_a_node_that_does_not_answer_is_reported_not_waited_on_forever(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, beta = fleet
    frozen = beta.children_pids()
    for pid in frozen:  # beta's pool processes stop answering (their snapshots still live)
        os.kill(pid, signal.SIGSTOP)
    try:
        done = cli(alpha, "reload", "sentiment", "--version", "1.1.0", "--timeout", "8", "--json")
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert done.returncode == 1, done.stdout + done.stderr
    outcome = json.loads(done.stdout)
    assert sorted(m["pid"] for m in outcome["missing"]) == sorted(frozen)
    assert all("no answer within 8 s" in m["error"] for m in outcome["missing"])
    assert {r["node"] for r in outcome["replies"]} == {alpha.node}


def test_reloads_sent_back_to_back_are_queued_never_interleaved(
    fleet: tuple[WorkerProcess, WorkerProcess],
) -> None:
    alpha, _ = fleet
    for version in ("1.1.0", "1.0.0", "1.1.0"):
        done = cli(alpha, "reload", "sentiment", "--version", version, "--no-wait")
        assert done.returncode == 0, done.stderr
    wait_for(lambda: versions(alpha) == ["1.1.0"] * 4, 90, "all processes to end on 1.1.0")
    log = alpha.log()
    # each process ran the three reloads one after the other, in order
    for pid in alpha.children_pids():
        steps = re.findall(rf"reloaded sentiment: (\S+) -> (\S+) in [\d.]+ s \[pid {pid}\]", log)
        assert steps == [("1.0.0", "1.1.0"), ("1.1.0", "1.0.0"), ("1.0.0", "1.1.0")], steps
