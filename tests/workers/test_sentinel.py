"""REDIS_URL=sentinel://...: a worker, a plain Celery client and the CLI all find the master
through Redis Sentinel (a real ``redis-server --sentinel``), and follow a failover to a replica."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from celery import Celery

from harness import ROOT, WorkerProcess, close_app, wait_for
from shared.settings import Settings
from tests.reliability.tools import seg_manifest
from workers.client import ModelClient
from workers.embedded import free_port

pytestmark = pytest.mark.integration
Start = Callable[..., WorkerProcess]
MASTER = "mwtest-master"  # not the default name: the setting must reach every connection

BINARY = shutil.which("redis-server")


def spawn(args: list[str], folder: Path, name: str) -> subprocess.Popen[bytes]:
    with (folder / f"{name}.log").open("ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=folder)


class SentinelSet:
    """A master, optionally a replica, and one sentinel watching the master, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.master_port, self.sentinel_port = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def server(self, port: int, *extra: str) -> None:
        data = self.folder / str(port)
        data.mkdir()
        args = [str(BINARY), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        self.procs.append(spawn([*args, "--dir", str(data), *extra], self.folder, str(port)))
        client = redis.Redis(port=port, socket_timeout=1)
        wait_for(lambda: _ping(client), 10, f"redis-server on {port}")
        client.close()

    def start(self) -> SentinelSet:
        self.server(self.master_port)
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.folder}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.master_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 2000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        self.procs.append(spawn([str(BINARY), str(conf), "--sentinel"], self.folder, "sentinel"))
        wait_for(self.master_addr, 10, "the sentinel to name the master")
        return self

    def master_addr(self) -> tuple[str, int] | None:
        client = redis.Redis(port=self.sentinel_port, socket_timeout=1)
        try:
            addr = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
            return (addr[0].decode(), int(addr[1])) if addr else None
        except redis.RedisError:
            return None
        finally:
            client.close()

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel_port}/0"

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def _role(client: redis.Redis) -> str | None:
    with suppress(redis.RedisError):
        return str(client.info("replication")["role"])
    return None


def _ping(client: redis.Redis) -> bool:
    with suppress(redis.RedisError):
        return bool(client.ping())
    return False


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    """Requested before ``start_worker`` by the tests, so that their workers stop first."""
    if BINARY is None:
        pytest.skip("no redis-server on PATH (Redis Sentinel is `redis-server --sentinel`)")
    folder = tmp_path / "sentinel"
    folder.mkdir()
    found = SentinelSet(folder)
    try:
        yield found.start()
    finally:
        found.close()


def sentinel_app(url: str, queue: str) -> Celery:
    """A publisher that knows only the Sentinel URL, the master's name, the queue and task names
    (results are read with the typed client: Celery's result consumer would try to unsubscribe
    through the sentinel long after the test, when it is gone)."""
    app = Celery(broker=url, backend="disabled://")
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"master_name": MASTER},
    )
    return app


def typed_client(url: str, worker: WorkerProcess) -> ModelClient:
    """The typed client, with its settings: the Sentinel URL and the master's name."""
    settings = Settings(
        redis_url=url,
        redis_sentinel_master=MASTER,
        key_prefix=worker.prefix,
        task_queue=worker.queue,
    )
    return ModelClient(settings=settings)


def cli(url: str, worker: WorkerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    prefix = worker.prefix
    env = {
        **os.environ,
        "MODELWORKERS_MODEL_MANIFEST": worker.env["MODELWORKERS_MODEL_MANIFEST"],
        "MODELWORKERS_REDIS_URL": url,
        "MODELWORKERS_REDIS_SENTINEL_MASTER": MASTER,
        "MODELWORKERS_KEY_PREFIX": prefix,
        "MODELWORKERS_TASK_QUEUE": prefix,
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_sentinel_worker(
    start_worker: Start, sentinels: SentinelSet, tmp_path: Path
) -> WorkerProcess:
    master_url = f"redis://127.0.0.1:{sentinels.master_port}/0"
    worker = start_worker(
        redis_url=master_url,  # what the harness itself reads (snapshots)
        pool="solo",
        concurrency=1,
        env={
            "MODELWORKERS_REDIS_URL": sentinels.url,  # what the worker connects with
            "MODELWORKERS_REDIS_SENTINEL_MASTER": MASTER,
            "MODELWORKERS_MODEL_MANIFEST": str(seg_manifest(tmp_path)),
        },
    )
    worker.wait_ready(1, timeout=120)
    return worker


def test_a_worker_serves_and_reports_through_sentinel(
    sentinels: SentinelSet, start_worker: Start, tmp_path: Path
) -> None:
    worker = start_sentinel_worker(start_worker, sentinels, tmp_path)
    connected = re.compile(
        rf"Connected to sentinel://(:\*\*@)?127\.0\.0\.1:{sentinels.sentinel_port}/"
    )
    wait_for(  # Celery's consumer logs where it connected (after the first snapshot, maybe)
        lambda: connected.search(worker.log()), 30, "the consumer to connect through the sentinel"
    )

    app, reader = sentinel_app(sentinels.url, worker.queue), typed_client(sentinels.url, worker)
    try:
        rows = [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5], [0.9, 0.1, 0.4]]
        task_id = app.send_task("clustering.fit", args=[rows, 2]).id
        assert len(reader.result(task_id, timeout=60)["labels"]) == 4
        typed = reader.send("clustering.fit", rows, 2)  # the typed client sends through it too
        assert len(reader.result(typed, timeout=60)["labels"]) == 4
    finally:
        close_app(app)
        reader.close()

    health = cli(sentinels.url, worker, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert json.loads(health.stdout)["processes"] == 1
    status = cli(sentinels.url, worker, "status", "--json")
    assert status.returncode == 0, status.stderr
    [proc] = json.loads(status.stdout)["processes"]
    assert proc["node"] == worker.node and proc["ready"]
    reload = cli(sentinels.url, worker, "reload", "seg", "--json")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert [r["node"] for r in json.loads(reload.stdout)["replies"]] == [worker.node]


def test_a_worker_follows_a_sentinel_failover(
    sentinels: SentinelSet, start_worker: Start, tmp_path: Path
) -> None:
    replica_port = free_port()
    sentinels.server(replica_port, "--replicaof", "127.0.0.1", str(sentinels.master_port))
    replica = redis.Redis(port=replica_port, socket_timeout=1)
    wait_for(
        lambda: replica.info("replication").get("master_link_status") == "up", 30, "replication"
    )
    worker = start_sentinel_worker(start_worker, sentinels, tmp_path)
    sentinel = redis.Redis(port=sentinels.sentinel_port, socket_timeout=5)
    # the sentinel must know the replica before it can promote it
    wait_for(
        lambda: sentinel.execute_command("SENTINEL", "replicas", MASTER), 30, "replica discovered"
    )

    def failover() -> bool:
        try:  # refused (NOGOODSLAVE) until the sentinel has the replica's INFO
            return bool(sentinel.execute_command("SENTINEL", "failover", MASTER))
        except redis.ResponseError as exc:
            if "NOGOODSLAVE" not in str(exc):
                raise
            return False

    wait_for(failover, 60, "the sentinel to accept a failover", interval=1.0)
    wait_for(lambda: sentinels.master_addr() == ("127.0.0.1", replica_port), 30, "the failover")
    sentinel.close()
    old = redis.Redis(port=sentinels.master_port, socket_timeout=1)
    # the old master demoted (it then drops its clients, which ask the sentinel again)
    wait_for(lambda: _role(old) == "slave", 30, "the old master to become a replica")
    old.close()

    # the worker's heartbeat reaches the new master; a task sent through the sentinel is served
    wait_for(
        lambda: any(replica.scan_iter(match=f"{worker.prefix}:proc:*")),
        30,
        "the worker's snapshot in the new master",
    )
    app, reader = sentinel_app(sentinels.url, worker.queue), typed_client(sentinels.url, worker)
    try:
        rows = [[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.5, 0.5], [0.9, 0.1, 0.4]]
        ids = [app.send_task("clustering.fit", args=[rows, 2]).id for _ in range(5)]
        for task_id in ids:
            assert len(reader.result(task_id, timeout=60)["labels"]) == 4
    finally:
        close_app(app)
        reader.close()
    health = cli(sentinels.url, worker, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert worker.alive()
    replica.close()
