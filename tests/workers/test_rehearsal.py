"""The rehearsal before READY: which tasks it runs, that it is not counted, that a failure is
logged and never raised, and in a real copy-on-write worker: every pool process rehearses,
lazy models stay unloaded, nothing is stored."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import WorkerProcess, build_kmeans, close_app, write_manifest
from shared.manifest import load_manifest
from shared.registry import ModelRegistry, ModelState, get_registry, set_registry
from shared.repository import load_repository
from tests.conftest import REPOSITORY

Start = Callable[..., WorkerProcess]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    """seg (sklearn, READY), later (sklearn, lazy: UNLOADED), tb (textblob, READY); installed as
    this process's registry, with the tasks registered on the app."""
    import tasks.clustering
    import tasks.forecasting
    import tasks.models
    import tasks.sentiment  # noqa: F401
    from workers.app import app

    app.set_current()
    build_kmeans(tmp_path / "seg.joblib", n_features=3)
    manifest = load_manifest(
        write_manifest(
            tmp_path,
            [
                {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
                {"name": "later", "family": "sklearn", "path": "seg.joblib", "lazy": True},
                {"name": "tb", "family": "textblob", "required": False},
            ],
        )
    )
    before = get_registry()
    reg = ModelRegistry()
    reg.load_all(manifest.specs)
    set_registry(reg)
    try:
        yield reg
    finally:
        set_registry(before)


def test_jobs_cover_ready_models_only_and_lazy_ones_stay_unloaded(registry: ModelRegistry) -> None:
    from workers.rehearsal import rehearsal_jobs

    jobs = rehearsal_jobs(registry)
    assert jobs == [
        ("clustering.assign", ([[0.0, 0.0, 0.0]],), {"model": "seg"}),
        ("models.predict", ("seg", [[0.0, 0.0, 0.0]]), {}),
        ("models.predict", ("tb", "warm up"), {}),
    ]
    assert registry.metadata("later").status is ModelState.UNLOADED


def test_the_sentiment_model_gets_both_sentiment_tasks(tmp_path: Path) -> None:
    from workers.rehearsal import rehearsal_jobs

    spec = load_repository(REPOSITORY).get("sentiment")
    (tmp_path / "sentiment").symlink_to(Path(spec.location), target_is_directory=True)
    manifest = load_manifest(
        write_manifest(
            tmp_path,
            [{"name": "sentiment", "family": "transformers", "path": "sentiment"}],
        )
    )
    reg = ModelRegistry(warmup=False)
    reg.load_all(manifest.specs)
    assert reg.metadata("sentiment").status is ModelState.READY
    names = [job[0] for job in rehearsal_jobs(reg)]
    assert names == ["sentiment.analyze", "sentiment.analyze_batch", "models.predict"]


def test_rehearsal_runs_the_tasks_but_counts_no_call(registry: ModelRegistry) -> None:
    from workers.rehearsal import rehearse

    seg = registry.get("seg")
    calls: list[int] = []
    original = seg.labels  # type: ignore[attr-defined]
    seg.labels = lambda rows: calls.append(len(rows)) or original(rows)  # type: ignore[attr-defined]
    assert rehearse(registry, rounds=2) == (3, 0)
    assert calls == [1, 1, 1, 1]  # both seg tasks' bodies ran, twice each
    assert registry.metadata("seg").calls == 0
    registry.observe("seg", 0.001, True)  # counting is back on afterwards
    assert registry.metadata("seg").calls == 1


def test_the_fit_tasks_are_rehearsed_on_inputs_they_accept(registry: ModelRegistry) -> None:
    from workers.rehearsal import fit_jobs, rehearsal_jobs, rehearse

    names = [job[0] for job in rehearsal_jobs(registry, fits=True)]
    assert names[:3] == ["forecast.prophet", "forecast.arima", "clustering.fit"]
    assert names[3:] == [job[0] for job in rehearsal_jobs(registry)]
    assert rehearse(registry, rounds=1, fits=True) == (len(names), 0)  # each one succeeded
    assert len(fit_jobs()) == 3


def test_a_failing_rehearsal_is_logged_not_raised(
    registry: ModelRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.rehearsal import rehearse

    def broken(rows: object) -> list[int]:
        raise RuntimeError("boom")

    registry.get("seg").labels = broken  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="modelworkers.worker"):
        assert rehearse(registry, rounds=2) == (3, 2)
    failures = [r.getMessage() for r in caplog.records if "rehearsal of" in r.getMessage()]
    assert len(failures) == 2 and all("boom" in f for f in failures)
    assert "clustering.assign" in failures[0] and "models.predict" in failures[1]
    assert registry.metadata("seg").calls == 0


@pytest.mark.integration
def test_every_pool_process_rehearses_before_ready_and_stores_nothing(
    start_worker: Start, tmp_path: Path
) -> None:
    real = load_repository(REPOSITORY)
    build_kmeans(tmp_path / "seg.joblib", n_features=3)
    (tmp_path / "sentiment").symlink_to(
        Path(real.get("sentiment").location), target_is_directory=True
    )
    manifest = write_manifest(
        tmp_path,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
            {"name": "later", "family": "sklearn", "path": "seg.joblib", "lazy": True},
            {
                "name": "sentiment",
                "family": "transformers",
                "path": "sentiment",
                "sha256": real.get("sentiment").sha256,
            },
        ],
    )
    worker = start_worker(
        concurrency=2,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), "MODELWORKERS_PRELOAD_MODE": "parent"},
    )
    snaps = worker.wait_ready(2)
    log = worker.log()
    child_lines = [line for line in log.splitlines() if "rehearsed 8 task(s) x 2 in" in line]
    assert len(child_lines) == 2 and all("ForkPoolWorker" in line for line in child_lines)
    for task in ("sentiment.analyze_batch", "forecast.prophet", "forecast.arima", "clustering.fit"):
        assert all(task in line for line in child_lines), task
    assert "rehearsal of" not in log  # no failure
    for snap in snaps:
        assert snap["models"]["later"]["status"] == "UNLOADED"
        assert {m["calls"] for m in snap["models"].values()} == {0}
    assert not list(worker.client.scan_iter("*rehearsal-*"))  # no result stored
    client = worker.app()
    got = client.send_task("clustering.assign", args=[[[1.0, 2.0, 3.0]]], kwargs={"model": "seg"})
    assert len(got.get(timeout=30)["labels"]) == 1
    close_app(client)


@pytest.mark.integration
def test_rehearsal_can_be_turned_off(start_worker: Start, tmp_path: Path) -> None:
    build_kmeans(tmp_path / "seg.joblib", n_features=3)
    manifest = write_manifest(
        tmp_path, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}]
    )
    worker = start_worker(
        concurrency=1,
        env={"MODELWORKERS_MODEL_MANIFEST": str(manifest), "MODELWORKERS_REHEARSE_TASKS": "false"},
    )
    worker.wait_ready(1)
    assert "rehearsed" not in worker.log()
