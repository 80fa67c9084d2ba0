"""The admin CLI against a live worker: status, health exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import ROOT, WorkerProcess
from workers.cli import worker_command
from workers.embedded import free_port

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health_exit_codes_follow_the_fleet(serving_worker: WorkerProcess) -> None:
    serving_worker.wait_ready(2)
    env = serving_worker.env
    ok = cli(env, "health", "--min-processes", "2")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ready"] is True
    assert cli(env, "health", "--min-processes", "3").returncode == 1
    assert cli({**env, "MODELWORKERS_KEY_PREFIX": "nobody-here"}, "health").returncode == 1
    down = cli({**env, "MODELWORKERS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "health")
    assert down.returncode == 2 and "cannot read the registry" in down.stderr


def test_status_shows_every_process_and_model(serving_worker: WorkerProcess) -> None:
    done = cli(serving_worker.env, "status", "--json")
    data = json.loads(done.stdout)
    assert data["summary"]["processes"] == 2 and data["summary"]["ready"] is True
    assert {p["pid"] for p in data["processes"]} == set(serving_worker.children_pids())
    table = cli({**serving_worker.env, "COLUMNS": "100"}, "status")
    assert "sentiment" in table.stdout and "READY" in table.stdout


def test_per_task_bookkeeping_follows_the_settings() -> None:
    """Task events and extended results are off unless asked for; `up --flower` asks (-E)."""
    code = (
        "import json, celeryconfig as c; print(json.dumps([c.worker_send_task_events, "
        "c.task_send_sent_event, c.result_extended, c.task_track_started]))"
    )

    def conf(**env: str) -> list[bool]:
        out = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        return list(json.loads(out.stdout.strip().splitlines()[-1]))

    assert conf(TASK_EVENTS="", RESULT_EXTENDED="", TRACK_STARTED="") == [
        False,
        False,
        False,
        False,
    ]
    assert conf(TASK_EVENTS="true", RESULT_EXTENDED="1", TRACK_STARTED="1") == [
        True,
        True,
        True,
        True,
    ]
    assert "-E" in worker_command(2, "prefork", "INFO", "n@h", events=True)
    assert "-E" not in worker_command(2, "prefork", "INFO", "n@h")


def test_health_prints_plain_json_at_any_terminal_width(serving_worker: WorkerProcess) -> None:
    """Piped into a JSON parser at COLUMNS=12, against a fleet and against an empty Redis."""
    serving_worker.wait_ready(2)
    for env, ready in (
        (serving_worker.env, True),
        ({**serving_worker.env, "MODELWORKERS_KEY_PREFIX": "none"}, False),
    ):
        done = subprocess.run(
            f"{sys.executable} -m workers.cli health | {sys.executable} -m json.tool",
            shell=True,
            cwd=ROOT,
            env={**env, "COLUMNS": "12"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr  # json.tool's exit status: it parsed
        assert json.loads(done.stdout)["ready"] is ready


def test_json_outputs_are_plain_and_error_texts_are_printed_verbatim(
    serving_worker: WorkerProcess,
) -> None:
    env = {**serving_worker.env, "COLUMNS": "20"}
    status = cli(env, "status", "--json")
    assert json.loads(status.stdout)["summary"]["processes"] == 2  # no wrapping, no markup
    refused = cli(env, "reload", "[bold]nope[red]")
    assert refused.returncode == 2
    assert "refused: model '[bold]nope[red]' is not in the manifest" in refused.stderr
