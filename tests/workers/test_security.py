"""Redis with a password: workers, CLI and Flower work, and the secret never shows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from workers.cli import flower_command, flower_env
from workers.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.integration
SECRET = "s3cr3t-Pa55word-for-tests"
Start = Callable[..., WorkerProcess]


@pytest.fixture
def locked_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(password=SECRET).start()
    try:
        yield server
    finally:
        server.close()


def test_password_redis_works_for_worker_cli_and_flower_and_never_leaks(
    start_worker: Start, locked_redis: EmbeddedRedis, worker_logs: Path, tmp_path: Path
) -> None:
    bare_url = f"redis://127.0.0.1:{locked_redis.port}/0"
    build_kmeans(tmp_path / "seg.joblib")
    build_kmeans(tmp_path / "dropped-in.pkl")  # not in the manifest: must never be loaded
    manifest = write_manifest(
        tmp_path,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib"},
            {"name": "textblob", "family": "textblob", "required": False},
        ],
    )
    worker = start_worker(
        redis_url=bare_url,
        concurrency=1,
        env={"MODELWORKERS_REDIS_PASSWORD": SECRET, "MODELWORKERS_MODEL_MANIFEST": str(manifest)},
    )
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(bare_url).ping()  # no password: refused
    worker.client = redis.Redis.from_url(locked_redis.url)
    snaps = worker.wait_ready(1)
    assert snaps[0]["unlisted_artifacts"] == ["dropped-in.pkl"]
    assert "dropped-in" not in json.dumps(snaps[0]["models"])
    app = worker.app()
    app.conf.broker_url = app.conf.result_backend = locked_redis.url
    assert app.send_task(
        "clustering.assign", args=[[[0.0, 1.0, 2.0]]], kwargs={"model": "seg"}
    ).get(timeout=30)["labels"]
    close_app(app)
    status = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status", "--json"],
        cwd=ROOT,
        env=worker.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and json.loads(status.stdout)["summary"]["ready"]
    # Flower with the same settings sees the worker
    port = free_port()
    log = (worker_logs / "flower-secure.log").open("wb")
    flower = subprocess.Popen(
        flower_command(port),
        cwd=ROOT,
        env=flower_env(worker.env, "ops:flower-pw"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def listed() -> Any:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/api/workers",
                    params={"refresh": "1"},
                    auth=("ops", "flower-pw"),
                    timeout=10,
                )
            except httpx.HTTPError:
                return None
            return r.status_code == 200 and worker.node in r.json()

        wait_for(listed, 90, "Flower to list the worker through the password Redis", 0.5)
    finally:
        flower.terminate()
        flower.wait(timeout=15)
        log.close()
    worker.stop()
    texts = [
        worker.log(),
        (worker_logs / "flower-secure.log").read_text(errors="replace"),
        status.stdout,
        status.stderr,
        json.dumps(snaps),
    ]
    assert not any(SECRET in text for text in texts)
    assert "redis://:**@" in worker.log()  # Celery's banner shows the URL, masked
