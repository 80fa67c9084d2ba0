"""transformers models on ONNX Runtime in a real worker (prefork, copy-on-write parent): the
backend each process runs is in its snapshot and log, children forked after the parent dropped
its sessions answer as torch does, and a version that cannot run on ONNX Runtime fails alone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import WorkerProcess, close_app
from shared.families.base import ModelContext
from shared.families.transformers_onnx import ONNX_FILE
from shared.families.transformers_sentiment import TransformersSentiment
from shared.manifest import artifact_sha256
from shared.repository import load_repository
from tests.conftest import REPOSITORY
from tests.tasks.test_contract import stored_error

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
TEXTS = ["a joyous, beautiful film", "boring and far too long", "ok", "meh, I guess"]


def repository_with_a_broken_onnx_version(repo: Path) -> None:
    """sentiment and textblob as shipped; subjectivity's one version without model.onnx, its
    option backend = "onnx" (a per-version option)."""
    for name in ("sentiment", "textblob"):
        shutil.copytree(REPOSITORY / name, repo / name)
    version = repo / "subjectivity" / "1.0.0"
    shutil.copytree(REPOSITORY / "subjectivity" / "1.0.0", version)
    (version / ONNX_FILE).unlink()
    (repo / "subjectivity" / "model.toml").write_text(
        'family = "transformers"\nrequired = false\n\n[[versions]]\nversion = "1.0.0"\n'
        f'path = "1.0.0"\nsha256 = "{artifact_sha256(version)}"\n'
        '[versions.options]\nbackend = "onnx"\n'
    )


def test_onnx_without_model_onnx_fails_that_version_and_the_worker_serves_the_rest(
    start_worker: Start, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repository_with_a_broken_onnx_version(repo)
    worker = start_worker(concurrency=2, env={"MODELWORKERS_MODEL_REPOSITORY": str(repo)})
    snaps = worker.wait_ready(2, timeout=120)
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # 2 processes share the cores
    for snap in snaps:
        failed = snap["models"]["subjectivity"]
        assert failed["status"] == "FAILED"
        assert "ArtifactError: backend 'onnx' needs" in failed["error"]
        assert f"{ONNX_FILE}, which does not exist" in failed["error"]
        assert "modelworkers models export-onnx" in failed["error"]
        served = snap["models"]["sentiment"]
        assert served["status"] == "READY"
        assert served["details"]["backend"] == "onnx"
        assert served["details"]["onnx_threads"] == threads
        assert served["details"]["onnx_shared_weights"] is True
    log = worker.log()
    assert "model subjectivity@1.0.0 FAILED: ArtifactError: backend 'onnx' needs" in log
    assert "model sentiment@1.0.0 READY" in log and "on cpu/onnx" in log

    spec = load_repository(repo).get("sentiment")
    local = TransformersSentiment(
        spec.model_copy(update={"options": {**spec.options, "backend": "torch"}}), ModelContext()
    )
    local.load()
    client = worker.app()
    try:
        for text, (label, score) in zip(TEXTS, local.classify(TEXTS), strict=True):
            got = client.send_task("sentiment.analyze", args=[text]).get(timeout=30)
            assert got["fallback"] is False and got["label"] == label
            assert got["score"] == pytest.approx(score, abs=1e-4)
        result = client.send_task("models.predict", args=["subjectivity", "a plot summary"])
        result.get(timeout=30, propagate=False)
        exc_type, message = stored_error(result)
        assert exc_type == "ModelNotReady" and "FAILED" in message
    finally:
        close_app(client)
    assert worker.alive()
