"""Settings are MODELWORKERS_*; the names before the prefix are still read, below the new ones,
with a warning naming both, for one release."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import settings as settings_module
from shared.settings import Settings


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No .env of the project's, no setting from the environment, fresh warnings."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv("MODELWORKERS_" + name.upper(), raising=False)
    settings_module._warn_legacy.cache_clear()
    yield
    settings_module._warn_legacy.cache_clear()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "modelworkers.settings"]


def test_the_prefixed_name_is_read_without_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MODELWORKERS_TASK_QUEUE", "jobs")
    with caplog.at_level(logging.WARNING):
        assert Settings().task_queue == "jobs"
    assert warnings_of(caplog) == []


def test_an_old_name_is_read_with_a_warning_naming_the_new_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASK_QUEUE", "legacy")
    monkeypatch.setenv("MAX_ROWS", "77")
    with caplog.at_level(logging.WARNING):
        got = Settings()
    assert (got.task_queue, got.max_rows) == ("legacy", 77)
    assert sorted(warnings_of(caplog)) == [
        "setting MAX_ROWS is deprecated: use MODELWORKERS_MAX_ROWS (the old name is read until "
        "the next release)",
        "setting TASK_QUEUE is deprecated: use MODELWORKERS_TASK_QUEUE (the old name is read "
        "until the next release)",
    ]


def test_the_new_name_wins_and_the_old_one_is_reported_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASK_QUEUE", "legacy")
    monkeypatch.setenv("MODELWORKERS_TASK_QUEUE", "jobs")
    with caplog.at_level(logging.WARNING):
        assert Settings().task_queue == "jobs"
    assert warnings_of(caplog) == [
        "setting TASK_QUEUE is ignored: MODELWORKERS_TASK_QUEUE is set (the old name is deprecated)"
    ]


def test_dotenv_old_names_are_read_and_new_names_in_dotenv_beat_old_ones_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / ".env").write_text("KEY_PREFIX=from-dotenv\nMODELWORKERS_TASK_QUEUE=dotenv-new\n")
    monkeypatch.setenv("TASK_QUEUE", "env-old")
    with caplog.at_level(logging.WARNING):
        got = Settings()
    assert (got.key_prefix, got.task_queue) == ("from-dotenv", "dotenv-new")
    assert any("KEY_PREFIX is deprecated" in w for w in warnings_of(caplog))
    assert any("TASK_QUEUE is ignored" in w for w in warnings_of(caplog))


def test_each_old_name_warns_once_per_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TASK_QUEUE", "legacy")
    with caplog.at_level(logging.WARNING):
        Settings()
        Settings()
    assert len(warnings_of(caplog)) == 1


def test_another_tools_own_variables_are_read_under_their_names_without_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:pw")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        s = Settings()
    assert s.flower_basic_auth is not None and s.flower_basic_auth.get_secret_value() == "ops:pw"
    assert s.prometheus_multiproc_dir == tmp_path
    assert warnings_of(caplog) == []
