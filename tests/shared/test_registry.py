from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from pathlib import Path

import pytest

from harness import build_kmeans, write_manifest
from shared.errors import ModelNotFound, ModelNotReady
from shared.families.sklearn_pipeline import SklearnPipeline
from shared.manifest import ModelSpec, load_manifest
from shared.registry import ModelRegistry, ModelState


def kmeans_specs(tmp_path: Path, **extra: object) -> dict[str, ModelSpec]:
    build_kmeans(tmp_path / "seg.joblib")
    build_kmeans(tmp_path / "seg2.joblib", k=2)
    (tmp_path / "garbage.joblib").write_bytes(b"not a pickle at all")
    manifest = load_manifest(
        write_manifest(
            tmp_path,
            [
                {"name": "seg", "family": "sklearn", "path": "seg.joblib", "version": "1", **extra},
                {"name": "seg", "family": "sklearn", "path": "seg2.joblib", "version": "2"},
                {"name": "seg", "family": "sklearn", "path": "garbage.joblib", "version": "bad"},
                {"name": "tb", "family": "textblob", "required": False},
                {
                    "name": "opt",
                    "family": "sklearn",
                    "path": "missing.joblib",
                    "required": False,
                    "fallback": "tb",
                    "sha256": "0" * 64,
                },
            ],
        )
    )
    return {f"{s.name}@{s.version}": s for s in manifest.specs}


def test_models_go_from_loading_to_ready_with_metadata(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    seen: list[tuple[str, str]] = []
    registry = ModelRegistry()
    registry.add_listener(lambda m: seen.append((m.name, str(m.status))))
    registry.load_all([specs["seg@1"], specs["tb@1.0.0"]])
    meta = registry.metadata("seg")
    assert meta.status is ModelState.READY and meta.version == "1"
    assert meta.load_seconds is not None and meta.load_seconds > 0 and meta.loaded_at
    assert meta.details["n_features"] == 3 and meta.device == "cpu"
    assert ("seg", "LOADING") in seen and ("seg", "READY") in seen
    assert seen.index(("seg", "LOADING")) < seen.index(("seg", "READY"))
    assert isinstance(registry.get("seg"), SklearnPipeline)


def test_a_failed_load_records_the_reason_and_the_fallback_answers(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry()
    registry.load_all([specs["opt@1.0.0"], specs["tb@1.0.0"], specs["seg@1"]])
    meta = registry.metadata("opt")
    assert meta.status is ModelState.FAILED and "missing" in (meta.error or "")
    with pytest.raises(ModelNotReady, match=r"'opt' is not ready \(state FAILED\)"):
        registry.get("opt")
    model, used_fallback = registry.get_with_fallback("opt")
    assert used_fallback and model.name == "tb"
    ready, reasons = registry.readiness()
    assert ready, reasons  # optional model covered by a READY fallback


def test_a_required_model_that_fails_makes_the_process_not_ready(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry()
    registry.load_all([specs["seg@bad"]])
    ready, reasons = registry.readiness()
    assert not ready and reasons[0].startswith("seg is FAILED")
    assert registry.snapshot()["not_ready_reasons"] == reasons


def test_unknown_names_raise_model_not_found_with_the_known_names(tmp_path: Path) -> None:
    registry = ModelRegistry()
    registry.load_all([kmeans_specs(tmp_path)["seg@1"]])
    with pytest.raises(ModelNotFound, match="'nope' is not in the manifest; known models: seg"):
        registry.get("nope")


def test_reload_swaps_to_the_new_version_and_frees_the_old(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry()
    registry.load_all([specs["seg@1"]])
    old = registry.get("seg")
    outcome = registry.reload(specs["seg@2"])
    assert outcome["ok"] and outcome["old_version"] == "1" and outcome["new_version"] == "2"
    new = registry.get("seg")
    assert new is not old and new.version == "2" and registry.metadata("seg").version == "2"
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None  # nothing but in-flight callers kept it; now it is freed


def test_a_failed_reload_keeps_the_old_version_serving(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry()
    registry.load_all([specs["seg@1"]])
    old = registry.get("seg")
    outcome = registry.reload(specs["seg@bad"])
    assert not outcome["ok"] and outcome["error"]
    assert registry.get("seg") is old and registry.metadata("seg").status is ModelState.READY
    assert registry.metadata("seg").reload_error == outcome["error"]
    assert registry.get("seg").labels([[0.0, 0.0, 0.0]]) == old.labels([[0.0, 0.0, 0.0]])


def test_requests_during_a_reload_are_served_by_the_old_or_the_new_version(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry()
    registry.load_all([specs["seg@1"]])
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                registry.get("seg").labels([[1.0, 2.0, 3.0]])
            except BaseException as exc:  # pragma: no cover - the assertion reports it
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for version in ("2", "1", "2"):
        assert registry.reload(specs[f"seg@{version}"])["ok"]
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert errors == []


def test_lazy_models_load_once_even_when_many_threads_ask_at_once(tmp_path: Path) -> None:
    specs = kmeans_specs(tmp_path, lazy=True)
    registry = ModelRegistry()
    loads: list[str] = []
    registry.add_listener(lambda m: loads.append(str(m.status)) if m.name == "seg" else None)
    registry.load_all([specs["seg@1"]])
    assert registry.metadata("seg").status is ModelState.UNLOADED
    assert registry.readiness()[0]  # lazy and not yet loaded is fine
    barrier = threading.Barrier(8)
    got: list[object] = []

    def first_use() -> None:
        barrier.wait()
        got.append(registry.get("seg"))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert loads.count("LOADING") == 1 and loads.count("READY") == 1


def test_concurrent_first_requests_load_a_lazy_model_once(tmp_path: Path) -> None:
    from tests.support.families import CountingModel

    spec = ModelSpec(
        name="lazy", family="test", implementation="tests.support.families:CountingModel", lazy=True
    )
    registry = ModelRegistry()
    registry.load_all([spec])
    assert registry.metadata("lazy").status is ModelState.UNLOADED and CountingModel.loads == 0
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(registry.get("lazy"))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(results) == 6 and len({id(r) for r in results}) == 1
    assert CountingModel.loads == 1 and registry.metadata("lazy").status is ModelState.READY


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_load_that_hangs_is_marked_failed_after_the_load_timeout(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "hangs.joblib")  # reading it blocks forever: no writer
    manifest = load_manifest(
        write_manifest(
            tmp_path,
            [
                {"name": "hangs", "family": "sklearn", "path": "hangs.joblib", "sha256": "0" * 64},
                {"name": "tb", "family": "textblob"},
            ],
            hash_paths=False,
        )
    )
    registry = ModelRegistry(load_timeout=1.0)
    t0 = time.monotonic()
    registry.load_all(manifest.specs)
    assert time.monotonic() - t0 < 10
    meta = registry.metadata("hangs")
    assert meta.status is ModelState.FAILED and "LoadTimeout" in (meta.error or "")
    assert registry.metadata("tb").status is ModelState.READY
    # unblock the stuck loader thread so that it exits
    fd = os.open(tmp_path / "hangs.joblib", os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


def test_serving_counters_track_calls_failures_and_latency(tmp_path: Path) -> None:
    registry = ModelRegistry()
    registry.load_all([kmeans_specs(tmp_path)["seg@1"]])
    for seconds in (0.001, 0.002, 0.003):
        registry.observe("seg", seconds, ok=True)
    registry.observe("seg", 0.010, ok=False)
    snap = registry.snapshot()["models"]["seg"]
    assert snap["calls"] == 4 and snap["failures"] == 1
    assert snap["latency_mean_ms"] == pytest.approx(4.0)
    assert snap["latency_p95_ms"] == pytest.approx(10.0)


def test_warm_all_before_fork_warms_only_fork_safe_models_once(tmp_path: Path) -> None:
    """The copy-on-write parent warms the families whose warm-up is fork-safe (textblob, not
    scikit-learn, whose OpenMP pool would not survive fork); the pool process then warms the
    rest, and not those again."""
    specs = kmeans_specs(tmp_path)
    registry = ModelRegistry(warmup=False)
    registry.load_all([specs["seg@1"], specs["tb@1.0.0"]])
    calls: list[str] = []
    for name in ("seg", "tb"):
        model = registry.get(name)
        real = model.warmup

        def record(real=real, name=name) -> None:  # type: ignore[no-untyped-def]
            calls.append(name)
            real()

        model.warmup = record  # type: ignore[method-assign]
    assert registry.get("tb").warm_before_fork and not registry.get("seg").warm_before_fork
    assert registry.warm_all(before_fork=True) == ["tb"] and calls == ["tb"]
    assert registry.get("tb").warmed_before_fork
    assert registry.warm_all() == ["seg"] and calls == ["tb", "seg"]
