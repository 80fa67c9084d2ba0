"""Redis ACL users (deploy/redis/users.acl, started by deploy/redis/start-redis.sh as compose
does): a client can enqueue tasks and read results and snapshots, and nothing else; a worker and
an admin can do their jobs without a single denial."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for, write_manifest
from shared.settings import Settings
from shared.state import read_snapshots
from shared.urls import redis_connection_url
from workers.cli import flower_command, flower_env
from workers.client import ModelClient
from workers.embedded import free_port

pytestmark = pytest.mark.integration
ACL_DIR = ROOT / "deploy" / "redis"
PASSWORDS = {"worker": "w-Pa55 word", "client": "c-Pa55/word", "admin": "a-Pa55@word"}
INSPECTOR = "inspector-pw"  # a test-only user that may read ACL LOG
NO_RETRY = Retry(NoBackoff(), 0)


def redis_7() -> str | None:
    """A redis-server of version 7 or later (the %R~ / %W~ key rules need 7.0)."""
    found = shutil.which("redis-server")
    if found is None:
        return None
    out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    version = re.search(r"v=(\d+)\.", out)
    return found if version and int(version.group(1)) >= 7 else None


@dataclass
class AclRedis:
    port: int
    proc: subprocess.Popen[bytes]

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def as_user(self, user: str) -> redis.Redis:
        password = INSPECTOR if user == "inspector" else PASSWORDS[user]
        return redis.Redis(port=self.port, username=user, password=password)

    def denials(self) -> list[tuple[str, str, str]]:
        """(user, reason, object) of every ACL denial so far."""
        log = self.as_user("inspector").acl_log(1000)
        return [(e["username"], e["reason"], e["object"]) for e in log]


def start_acl_redis(folder: Path, env: dict[str, str]) -> AclRedis:
    port = free_port()
    script = ["sh", str(ACL_DIR / "start-redis.sh"), "--port", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*script, "--save", "", "--appendonly", "no", "--dir", str(folder)],
        env={
            "PATH": str(Path(redis_7() or "").parent) + ":/usr/bin:/bin",
            "ACL_OUT": str(folder / "users.acl"),
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port, proc), 10, "the ACL Redis to answer")
    except BaseException:
        stop(proc)
        raise
    return AclRedis(port, proc)


def _answers(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """Any reply to PING (NOAUTH included) means the server is up."""
    if proc.poll() is not None:
        raise RuntimeError(f"redis-server exited with {proc.returncode}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return bool(sock.recv(64))
    except OSError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def need_redis_7() -> None:
    """Skip here, fail in CI (CI=true), where the ACL tests must run."""
    why = "needs redis-server 7 or later on PATH (ACL key rules %R~/%W~)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(why + ": CI installs one (.ci/run)")
    pytest.skip(why)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    if redis_7() is None:
        need_redis_7()
    # The repository's rules, plus a user that may read ACL LOG (tests only).
    acl = tmp_path / "users.acl.in"
    acl.write_text(
        (ACL_DIR / "users.acl").read_text()
        + "user inspector on resetkeys resetchannels -@all +acl|log\n"
    )
    env = {f"REDIS_{u.upper()}_PASSWORD": p for u, p in PASSWORDS.items()}
    server = start_acl_redis(
        tmp_path, {**env, "REDIS_INSPECTOR_PASSWORD": INSPECTOR, "ACL_FILE": str(acl)}
    )
    try:
        yield server
    finally:
        stop(server.proc)


def role_env(user: str) -> dict[str, str]:
    return {"MODELWORKERS_REDIS_USERNAME": user, "MODELWORKERS_REDIS_PASSWORD": PASSWORDS[user]}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_client_user_enqueues_and_reads_but_cannot_reload_or_write_the_registry(
    acl_redis: AclRedis, worker_logs: Path, tmp_path: Path
) -> None:
    build_kmeans(tmp_path / "seg.joblib")
    manifest = write_manifest(
        tmp_path,
        [
            {"name": "seg", "family": "sklearn", "path": "seg.joblib", "active": True},
            {"name": "seg", "family": "sklearn", "path": "seg.joblib", "version": "2.0.0"},
        ],
    )
    # The rules name the default KEY_PREFIX and TASK_QUEUE: modelworkers. Mingle, gossip and
    # events on, as in compose: the worker user must cover all of Celery's keys and channels.
    worker = WorkerProcess(
        acl_redis.url(),
        prefix="modelworkers",
        node="worker@acl-test",
        concurrency=1,
        log_dir=worker_logs,
        env={**role_env("worker"), "MODELWORKERS_MODEL_MANIFEST": str(manifest)},
    )
    worker.args = [a for a in worker.args if a not in ("--without-mingle", "--without-gossip")]
    worker.args.append("-E")
    with worker:
        check_the_roles(acl_redis, worker, worker_logs)


def check_the_roles(acl_redis: AclRedis, worker: WorkerProcess, worker_logs: Path) -> None:
    admin = acl_redis.as_user("admin")
    worker.client = admin
    first = worker.wait_ready(1, timeout=120)
    beat = first[0]["heartbeat"]

    # --- the client: tasks and results, read-only snapshots ---------------------------------
    client = acl_redis.as_user("client")
    snap_key = next(iter(client.scan_iter(match="modelworkers:proc:*")))
    assert read_snapshots(client, "modelworkers")  # routing and health may read them
    refused = {
        "publish a reload": lambda: client.publish("modelworkers:control", "{}"),
        "write desired versions": lambda: client.hset("modelworkers:desired", "seg", "2.0.0"),
        "write a node's desired versions": lambda: client.hset(
            "modelworkers:desired:worker@acl-test", "seg", "2.0.0"
        ),
        "write history": lambda: client.lpush("modelworkers:history:seg", "2.0.0"),
        "write a snapshot": lambda: client.set("modelworkers:proc:evil:1", "{}"),
        "overwrite a snapshot": lambda: client.set(snap_key, "{}"),
        "delete a snapshot": lambda: client.delete(snap_key),
        "write a result": lambda: client.set("celery-task-meta-x", "{}"),
        "drop the queue": lambda: client.delete("modelworkers"),
        "read the queue": lambda: client.lrange("modelworkers", 0, -1),
        "Celery remote control": lambda: client.publish("/0.celery.pidbox", "{}"),
        "list channels": lambda: client.pubsub_channels(),
    }
    for what, action in refused.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            action()
            pytest.fail(f"the client could {what}")
    settings = Settings(
        redis_url=acl_redis.url(), redis_username="client", redis_password=PASSWORDS["client"]
    )
    with ModelClient(settings=settings, timeout=30) as typed:
        assert typed.assign([[0.0, 1.0, 2.0]], model="seg").version == "1.0.0"
    app = worker.app()  # a plain Celery client, with Celery's own result backend
    app.conf.broker_url = app.conf.result_backend = redis_connection_url(settings)
    try:
        answer = app.send_task(
            "clustering.assign", args=[[[0.0, 1.0, 2.0]]], kwargs={"model": "seg"}
        )
        assert answer.get(timeout=30)["labels"]
        del answer
        gc.collect()  # a collected AsyncResult unsubscribes: now, while this Redis still runs
    finally:
        close_app(app)
    as_client = {**worker.env, **role_env("client")}
    denied = cli(as_client, "reload", "seg", "--version", "2.0.0", "--timeout", "10")
    assert denied.returncode == 2, denied.stderr
    assert "refused by Redis, this Redis user may not send control requests" in denied.stderr
    status = cli(as_client, "status", "--json")  # reading the registry is allowed
    assert status.returncode == 0 and json.loads(status.stdout)["summary"]["ready"]
    assert admin.hgetall("modelworkers:desired") == {}

    # --- the admin: the CLI's control requests, end to end ----------------------------------
    as_admin = {**worker.env, **role_env("admin")}
    done = cli(as_admin, "reload", "seg", "--version", "2.0.0", "--json", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome["ok"] and len(outcome["replies"]) == 1
    assert outcome["replies"][0]["results"][0]["new_version"] == "2.0.0"
    assert admin.hget("modelworkers:desired", "seg") == b"2.0.0"
    back = cli(as_admin, "rollback", "seg", "--json", "--timeout", "60")
    assert back.returncode == 0 and json.loads(back.stdout)["ok"], back.stderr
    ping = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "ping", "-t", "10"],
        cwd=ROOT,
        env=as_admin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "worker@acl-test: OK" in ping.stdout, ping.stdout + ping.stderr
    port = free_port()
    log = (worker_logs / "flower-acl.log").open("wb")
    flower = subprocess.Popen(
        flower_command(port),
        cwd=ROOT,
        env=flower_env(as_admin, "ops:flower-pw"),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def listed() -> Any:
            with suppress(httpx.HTTPError):
                r = httpx.get(
                    f"http://127.0.0.1:{port}/api/workers",
                    params={"refresh": "1"},
                    auth=("ops", "flower-pw"),
                    timeout=10,
                )
                return r.status_code == 200 and worker.node in r.json()
            return None

        wait_for(listed, 90, "Flower (admin user) to list the worker", 0.5)
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait(timeout=5)
        log.close()

    # --- the worker: loaded, beating, serving (above), and never denied -----------------------
    wait_for(
        lambda: any(s["heartbeat"] > beat for s in worker.snapshots()), 10, "a later heartbeat"
    )
    assert [s["models"]["seg"]["version"] for s in worker.snapshots()] == ["1.0.0"]
    assert worker.alive()
    # What a worker does on paths this run did not take: count a lost delivery (poison
    # tasks), put desired versions back after a failed request, reload_models (Celery
    # remote control: a node's desired versions and a request on the control channel).
    as_worker = acl_redis.as_user("worker")
    assert as_worker.incr("modelworkers:lost:some-task") == 1
    assert as_worker.expire("modelworkers:lost:some-task", 60)
    as_worker.hset("modelworkers:desired:worker@acl-test", "seg", "1.0.0")
    as_worker.hdel("modelworkers:desired:worker@acl-test", "seg")
    as_worker.publish("modelworkers:control", "not a request")  # logged and ignored
    denials = acl_redis.denials()
    assert {user for user, _, _ in denials} == {"client"}, denials
    flower_log = (worker_logs / "flower-acl.log").read_text(errors="replace")
    assert "NOPERM" not in worker.log() and "no permissions" not in flower_log
    # No role may wipe, list or reconfigure the server: those commands ignore key rules.
    for role in ("worker", "admin", "client"):
        user = acl_redis.as_user(role)
        for command in (("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "*"), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.execute_command(*command)


def test_the_start_script_needs_every_role_password_and_keeps_the_default_user_optional(
    tmp_path: Path,
) -> None:
    if redis_7() is None:
        need_redis_7()
    env = {f"REDIS_{u.upper()}_PASSWORD": p for u, p in PASSWORDS.items()}
    missing = subprocess.run(
        ["sh", str(ACL_DIR / "start-redis.sh")],
        env={"PATH": "/usr/bin:/bin", "ACL_OUT": str(tmp_path / "a.acl"), **env}
        | {"REDIS_ADMIN_PASSWORD": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2
    assert "REDIS_ADMIN_PASSWORD is not set" in missing.stderr
    for legacy in (None, "legacy-pw"):
        folder = tmp_path / str(legacy)
        folder.mkdir()
        extra = {"MODELWORKERS_REDIS_PASSWORD": legacy} if legacy else {}
        server = start_acl_redis(folder, {**env, **extra})
        try:
            rendered = (folder / "users.acl").read_text()
            assert not any(p in rendered for p in PASSWORDS.values())  # hashes only
            assert (folder / "users.acl").stat().st_mode & 0o077 == 0
            assert server.as_user("worker").ping()
            plain = redis.Redis(port=server.port, password=legacy or "x", retry=NO_RETRY)
            if legacy:  # the layout without ACL users keeps working
                plain.set("anything", "1")
            else:
                with pytest.raises(redis.exceptions.AuthenticationError):
                    plain.ping()
        finally:
            stop(server.proc)
