from __future__ import annotations

from pathlib import Path

import pytest

from harness import build_kmeans, write_manifest
from shared.errors import ArtifactError, ModelNotFound
from shared.manifest import artifact_sha256, load_manifest, verify_artifact
from shared.repository import load_repository


def test_a_valid_manifest_lists_each_entry_with_its_absolute_location(tmp_path: Path) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    path = write_manifest(
        tmp_path,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib", "version": "2.0"},
            {"name": "textblob", "family": "textblob", "required": False},
        ],
    )
    manifest = load_manifest(path)
    assert manifest.problems == {}
    seg = manifest.get("seg")
    assert seg.version == "2.0" and Path(seg.location) == (tmp_path / "seg.joblib").resolve()
    assert verify_artifact(seg) == Path(seg.location)


def test_a_bad_entry_is_reported_by_name_and_the_others_still_load(tmp_path: Path) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    path = write_manifest(
        tmp_path,
        [
            {"name": "broken", "family": "no such family!", "path": "x.joblib"},
            {"name": "escape", "family": "sklearn", "path": "../etc/passwd"},
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
        ],
    )
    manifest = load_manifest(path)
    assert [s.name for s in manifest.specs] == ["seg"]
    assert "family" in manifest.problems["broken"]
    assert "path" in manifest.problems["escape"]


def test_files_the_manifest_does_not_list_are_reported_as_unlisted(tmp_path: Path) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    build_kmeans(tmp_path / "dropped-in.pkl")
    manifest = load_manifest(
        write_manifest(tmp_path, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}])
    )
    assert manifest.unlisted == ["dropped-in.pkl"]


def test_a_changed_artifact_fails_its_checksum_with_a_clear_error(tmp_path: Path) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    manifest = load_manifest(
        write_manifest(tmp_path, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}])
    )
    with (tmp_path / "seg.joblib").open("r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ArtifactError, match=r"seg.*sha256"):
        verify_artifact(manifest.get("seg"))


def test_directory_checksums_change_when_any_file_changes(tmp_path: Path) -> None:
    d = tmp_path / "model"
    d.mkdir()
    (d / "a.json").write_text("{}")
    (d / "b.bin").write_bytes(b"123")
    before = artifact_sha256(d)
    (d / "b.bin").write_bytes(b"124")
    assert artifact_sha256(d) != before


def test_versions_are_looked_up_by_name_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    build_kmeans(tmp_path / "a.joblib")
    build_kmeans(tmp_path / "b.joblib", k=2)
    manifest = load_manifest(
        write_manifest(
            tmp_path,
            [
                {"name": "seg", "family": "sklearn", "path": "a.joblib", "version": "1"},
                {
                    "name": "seg",
                    "family": "sklearn",
                    "path": "b.joblib",
                    "version": "2",
                    "active": True,
                },
            ],
        )
    )
    assert manifest.get("seg").version == "2"
    assert manifest.get("seg", "1").path == "a.joblib"
    with pytest.raises(ModelNotFound, match="no version '3'"):
        manifest.get("seg", "3")
    with pytest.raises(ModelNotFound, match="'nope' is not in the manifest"):
        manifest.get("nope")


def test_the_projects_manifest_is_valid_and_every_artifact_verifies() -> None:
    from tests.conftest import REPOSITORY

    manifest = load_repository(REPOSITORY)
    assert manifest.problems == {} and manifest.unlisted == []
    assert {"sentiment", "textblob", "customer_segments", "co2_prophet", "sunspots_arima"} <= set(
        manifest.names
    )
    for spec in manifest.specs:
        if spec.path:
            verify_artifact(spec)
