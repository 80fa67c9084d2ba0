"""The model repository: one folder per model with a model.toml (shared/repository.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import ROOT, build_kmeans, write_manifest
from shared.manifest import manifest_from_settings, verify_artifact
from shared.repository import ModelFile, VersionEntry, load_repository, write_model_file
from shared.settings import Settings


def kmeans_model(repo: Path, name: str = "seg", **fields: object) -> Path:
    folder = repo / name
    build_kmeans(folder / "1.joblib")
    build_kmeans(folder / "2.joblib", k=2)
    digest = {
        p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in ("1.joblib", "2.joblib")
    }
    model = ModelFile(
        family="sklearn",
        versions=[
            VersionEntry(version="1", path="1.joblib", sha256=digest["1.joblib"]),
            VersionEntry(version="2", path="2.joblib", sha256=digest["2.joblib"], options={"k": 2}),
        ],
        options={"k": 3},
        **fields,  # type: ignore[arg-type]
    )
    write_model_file(folder, model)
    return folder


def test_each_folder_with_a_model_file_is_a_model_with_its_versions(tmp_path: Path) -> None:
    kmeans_model(tmp_path, queue="gpu", default_version="2", required=False)
    manifest = load_repository(tmp_path)
    assert manifest.problems == {} and manifest.unlisted == []
    one, two = manifest.versions("seg")
    assert (one.version, one.path, one.active, one.options) == (
        "1",
        "seg/1.joblib",
        False,
        {"k": 3},
    )
    assert (two.version, two.active, two.options, two.queue) == ("2", True, {"k": 2}, "gpu")
    assert manifest.get("seg").version == "2" and not two.required
    verify_artifact(two)


def test_a_broken_model_file_is_reported_by_folder_and_the_others_load(tmp_path: Path) -> None:
    kmeans_model(tmp_path)
    for folder, text, problem in [
        ("nofamily", '[[versions]]\nversion = "1"\n', "family or implementation"),
        ("noversion", 'family = "sklearn"\n', "at least one [[versions]]"),
        (
            "twice",
            'family = "x"\n[[versions]]\nversion = "1"\n[[versions]]\nversion = "1"\n',
            "listed twice",
        ),
        (
            "default",
            'family = "x"\ndefault_version = "9"\n[[versions]]\nversion = "1"\n',
            "'9' is not one",
        ),
        (
            "outside",
            'family = "x"\n[[versions]]\nversion = "1"\npath = "../seg/1.joblib"\n',
            "path",
        ),
        ("typo", 'family = "x"\nrequird = true\n[[versions]]\nversion = "1"\n', "requird"),
        ("notoml", "family = \n", "cannot be read"),
    ]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.toml").write_text(text)
        manifest = load_repository(tmp_path)
        assert problem in manifest.problems[folder], (folder, manifest.problems)
    assert manifest.names == ["seg"]


def test_discovery_looks_one_level_down_and_only_inside_model_folders(tmp_path: Path) -> None:
    kmeans_model(tmp_path)
    (tmp_path / "seg" / "stray.joblib").write_bytes(b"x")  # in a model's folder: reported
    venv = tmp_path / ".venv" / "lib" / "site-packages"  # another tree beside the models
    for i in range(2000):
        (venv / f"pkg{i}").mkdir(parents=True)
        (venv / f"pkg{i}" / "data.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "old.pkl").write_bytes(b"x")  # no model file: not a model, not read
    t0 = time.perf_counter()
    manifest = load_repository(tmp_path)
    assert time.perf_counter() - t0 < 0.5
    assert manifest.unlisted == ["seg/stray.joblib"] and manifest.names == ["seg"]


def test_the_settings_choose_the_repository_or_a_single_file_manifest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kmeans_model(tmp_path / "repo")
    assert manifest_from_settings(Settings(model_repository=tmp_path / "repo")).names == ["seg"]
    build_kmeans(tmp_path / "old" / "a.joblib")
    legacy = write_manifest(
        tmp_path / "old", [{"name": "a", "family": "sklearn", "path": "a.joblib"}]
    )
    with caplog.at_level("WARNING"):
        old = manifest_from_settings(Settings(model_manifest=legacy))
    assert old.names == ["a"] and "single-file manifest" in caplog.text
    assert manifest_from_settings(Settings(model_repository=legacy)).names == ["a"]


def test_make_models_writes_only_its_own_model_folders(tmp_path: Path) -> None:
    """The build script rebuilds a built-in model into a repository that also holds a user's
    model: the user's folder is untouched, byte for byte."""
    user = kmeans_model(tmp_path, name="my_model")
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    done = subprocess.run(
        [
            sys.executable,
            "scripts/build_models.py",
            "--only",
            "customer_segments",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before
    manifest = load_repository(tmp_path)
    assert set(manifest.names) == {"customer_segments", "my_model"} and manifest.problems == {}
    verify_artifact(manifest.get("customer_segments"))
