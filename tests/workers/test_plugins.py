"""Your own models: a family written outside the project, served by configuration alone.

The family is a scikit-learn Ridge regressor on the diabetes data that ships with scikit-learn,
written by the test into a folder outside the project tree (its own package), with a model
repository of its own. Once through ``implementation = "ridge_family:RidgeRegressor"`` and
PYTHONPATH, once installed into a virtual environment that declares a ``modelworkers.families``
entry point: no file of the project changes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for
from shared.repository import ModelFile, VersionEntry, write_model_file
from tests.workers.test_flower_metrics import metric
from workers.embedded import free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]

FAMILY = '''
"""A Ridge regression family for modelworkers: rows of numbers in, {"values": [...]} out."""

import math

from shared.errors import InvalidInput
from shared.families.base import Model
from shared.manifest import verify_artifact


class RidgeRegressor(Model):
    family = "ridge"

    def load(self):
        import joblib

        self._model = joblib.load(verify_artifact(self.spec))  # sha256 checked first
        self.n_features = int(self._model.n_features_in_)

    def validate(self, inputs):
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("inputs", "must be a non-empty list of rows")
        for i, row in enumerate(inputs):
            if not isinstance(row, list) or len(row) != self.n_features:
                raise InvalidInput(f"inputs[{i}]", f"must be {self.n_features} numbers")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row):
                raise InvalidInput(f"inputs[{i}]", "must hold finite numbers only")
        return inputs

    def predict(self, inputs):
        return {"values": [float(v) for v in self._model.predict(inputs)]}

    def example(self):
        return [[0.0] * self.n_features]

    def describe(self):
        return {"n_features": self.n_features}
'''


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_ridge(path: Path, alpha: float) -> Any:
    """Ridge(alpha) on scikit-learn's bundled diabetes data, saved with joblib."""
    import joblib
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge

    x, y = load_diabetes(return_X_y=True)
    model = Ridge(alpha=alpha).fit(x, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, path)
    return model


def repository(root: Path, **model_fields: Any) -> tuple[Path, dict[str, Any]]:
    """A repository outside the project: ``ridge`` (versions 1, 2 and a corrupt one) and ``seg``
    (a built-in family), each with its model file."""
    repo = root / "repo"
    models = {"1": build_ridge(repo / "ridge" / "1.joblib", 1.0)}
    models["2"] = build_ridge(repo / "ridge" / "2.joblib", 0.05)
    good = (repo / "ridge" / "2.joblib").read_bytes()
    (repo / "ridge" / "bad.joblib").write_bytes(good[: len(good) // 2])  # truncated
    write_model_file(
        repo / "ridge",
        ModelFile(
            **model_fields,
            versions=[
                VersionEntry(
                    version=v, path=f"{v}.joblib", sha256=sha256(repo / "ridge" / f"{v}.joblib")
                )
                for v in ("1", "2")
            ]
            + [
                VersionEntry(
                    version="bad", path="bad.joblib", sha256=sha256(repo / "ridge" / "2.joblib")
                )
            ],
        ),
    )
    build_kmeans(repo / "seg" / "1.joblib")
    write_model_file(
        repo / "seg",
        ModelFile(
            family="sklearn",
            versions=[
                VersionEntry(version="1", path="1.joblib", sha256=sha256(repo / "seg" / "1.joblib"))
            ],
        ),
    )
    return repo, models


def rows() -> list[list[float]]:
    from sklearn.datasets import load_diabetes

    return [[round(float(v), 6) for v in row] for row in load_diabetes().data[:5]]


def cli(worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=180,
    )


class Stream:
    """ridge predictions sent back to back from a thread, each waited for (a client)."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.app = worker.app()
        self.results: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                result = self.app.send_task("models.predict", args=["ridge", rows()[:1]])
                self.results.append(result.get(timeout=30))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        close_app(self.app)


def test_a_family_of_your_own_is_served_by_configuration_alone(
    start_worker: Start, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("user-project")  # not under the project tree
    assert ROOT not in outside.parents
    (outside / "src" / "ridge_family").mkdir(parents=True)
    (outside / "src" / "ridge_family" / "__init__.py").write_text(FAMILY)
    repo, fitted = repository(outside, implementation="ridge_family:RidgeRegressor")
    port = free_port()
    worker = start_worker(
        concurrency=2,
        env={
            "MODELWORKERS_MODEL_REPOSITORY": str(repo),
            "PYTHONPATH": str(outside / "src"),
            "MODELWORKERS_METRICS_PORT": str(port),
            "MODELWORKERS_PRELOAD_MODE": "child",
        },
    )
    snaps = worker.wait_ready(2)
    for snap in snaps:  # loaded, warmed, rehearsed before READY, nothing counted
        ridge = snap["models"]["ridge"]
        assert ridge["status"] == "READY" and ridge["version"] == "1" and ridge["calls"] == 0
        assert ridge["family"] == "RidgeRegressor" and ridge["details"] == {"n_features": 10}
    rehearsed = [line for line in worker.log().splitlines() if "rehearsed" in line]
    assert len(rehearsed) == 2 and all("models.predict" in line for line in rehearsed)

    app = worker.app()
    try:
        answer = app.send_task("models.predict", args=["ridge", rows()]).get(timeout=30)
        assert answer["model"] == "ridge" and answer["version"] == "1" and not answer["fallback"]
        assert answer["outputs"]["values"] == pytest.approx(fitted["1"].predict(rows()).tolist())
        bad = app.send_task("models.predict", args=["ridge", [[1.0, 2.0]]])
        bad.get(timeout=30, propagate=False)
        assert type(bad.result).__name__ == "InvalidInput"
        assert str(bad.result) == "inputs[0]: must be 10 numbers"

        # a fleet reload to version 2 under a task stream: nothing fails
        with Stream(worker) as stream:
            wait_for(lambda: len(stream.results) >= 5, 30, "the stream to run")
            done = cli(worker, "reload", "ridge", "--version", "2", "--wait", "--json")
            served = len(stream.results)
            wait_for(lambda: len(stream.results) >= served + 5, 30, "tasks after the reload")
        assert done.returncode == 0, done.stdout + done.stderr
        assert stream.errors == [] and {r["version"] for r in stream.results} >= {"1", "2"}
        after = app.send_task("models.predict", args=["ridge", rows()]).get(timeout=30)
        assert after["version"] == "2"
        assert after["outputs"]["values"] == pytest.approx(fitted["2"].predict(rows()).tolist())

        # a corrupt version fails with its reason; version 2 and every other model serve on
        failed = cli(worker, "reload", "ridge", "--version", "bad", "--wait", "--json")
        assert failed.returncode == 1
        outcome = json.loads(failed.stdout)
        errors = {r["error"] for reply in outcome["replies"] for r in reply["results"]}
        assert len(errors) == 1 and "ArtifactError" in errors.pop()
        still = app.send_task("models.predict", args=["ridge", rows()[:1]]).get(timeout=30)
        assert still["version"] == "2"
        seg = app.send_task("clustering.assign", args=[[[0.1, 0.2, 0.3]]], kwargs={"model": "seg"})
        assert len(seg.get(timeout=30)["labels"]) == 1

        # like the built-ins: in status, in Celery's stats (Flower's worker page), on /metrics
        status = json.loads(cli(worker, "status", "--json").stdout)
        assert status["summary"]["models"]["ridge"]["versions"] == {"2": 2}
        stats = app.control.inspect(destination=[worker.node], timeout=5).stats()
        assert stats[worker.node]["model_registry.ridge"].startswith("READY 2/2 v2 ")
    finally:
        close_app(app)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert metric(text, "modelworkers_inference_total", model="ridge") >= 10
    assert metric(text, "modelworkers_model_ready", model="ridge", version="2", status="READY") == 2


PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "ridge-family"
version = "0.1.0"

[project.entry-points."modelworkers.families"]
ridge = "ridge_family:RidgeRegressor"
"""


def test_a_family_installed_with_an_entry_point_is_served_without_a_change_to_the_project(
    redis_url: str, worker_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("plugin-package")
    package = outside / "ridge-family"
    (package / "ridge_family").mkdir(parents=True)
    (package / "ridge_family" / "__init__.py").write_text(FAMILY)
    (package / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    # A virtual environment of its own that sees this project's installed packages (as a
    # deployment's venv would hold them), then the plugin installed into it with pip.
    venv = outside / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    base = next(p for p in map(Path, sys.path) if p.name == "site-packages" and ".venv" in str(p))
    (site / "project-packages.pth").write_text(f"import site; site.addsitedir({str(base)!r})\n")
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(package),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    repo, fitted = repository(outside, family="ridge")
    worker = WorkerProcess(
        redis_url,
        concurrency=1,
        env={"MODELWORKERS_MODEL_REPOSITORY": str(repo)},
        log_dir=worker_logs,
    )

    worker.args[0] = str(python)  # the plugin's environment, this project's code
    worker.start()
    try:
        snap = worker.wait_ready(1)[0]
        assert (
            snap["models"]["ridge"]["status"] == "READY"
            and snap["models"]["ridge"]["family"] == "ridge"
        )
        app = worker.app()
        answer = app.send_task("models.predict", args=["ridge", rows()]).get(timeout=30)
        close_app(app)
        assert answer["outputs"]["values"] == pytest.approx(fitted["1"].predict(rows()).tolist())
    finally:
        worker.stop()
    # the project did not change: the family is known only inside that environment
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shared.families import registered; print(sorted(registered()))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "ridge" not in done.stdout
