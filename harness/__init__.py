"""What the test suite and the benchmark share: real ``celery worker`` processes (started as
subprocesses, waited on through the registry in Redis, always stopped by PID), client clean-up,
polling, and toy models and manifests that the production code loads. Not part of the wheel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from shared.manifest import artifact_sha256
from workers.cli import worker_command

ROOT = Path(__file__).resolve().parent.parent


def close_app(app: Celery) -> None:
    """Close a client app, its result listener included (else it outlives the test's Redis)."""
    with suppress(Exception):
        consumer = getattr(app.backend, "result_consumer", None)
        if consumer is not None and getattr(consumer, "_pubsub", None) is not None:
            consumer.stop()
    app.close()


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r:.300})")


class WorkerProcess:
    """One ``celery -A workers.app worker`` node with its own queue and registry prefix."""

    def __init__(
        self,
        redis_url: str,
        *,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
        log_dir: Path,
        prefix: str | None = None,
        node: str | None = None,
        broker_url: str | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.broker_url = broker_url or redis_url  # BROKER_URL (e.g. RabbitMQ), else Redis
        self.prefix = prefix or f"mwtest-{uuid.uuid4().hex[:8]}"
        self.queue = self.prefix
        self.node = node or f"{self.prefix}@testhost"
        self.concurrency = concurrency
        self.log_path = log_dir / f"{self.node.replace('@', '_')}.log"
        self.env = {
            **os.environ,
            "MODELWORKERS_REDIS_URL": redis_url,
            "MODELWORKERS_KEY_PREFIX": self.prefix,
            "MODELWORKERS_TASK_QUEUE": self.queue,
            "MODELWORKERS_HEARTBEAT_SECONDS": "0.5",
            "MODELWORKERS_STATE_TTL_SECONDS": "5",
            "PYTHONUNBUFFERED": "1",
            **({"MODELWORKERS_BROKER_URL": broker_url} if broker_url else {}),
            **(env or {}),
        }
        self.args = [
            *worker_command(concurrency, pool, "INFO", self.node, self.queue),
            *(extra_args or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis.from_url(redis_url)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole process group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers: pool children
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the worker and all its pool processes (a node crash)."""
        assert self.proc is not None
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- registry in Redis ------------------------------------------------------------------
    def snapshots(self) -> list[dict[str, Any]]:
        keys = list(self.client.scan_iter(match=f"{self.prefix}:proc:*"))
        raws = self.client.mget(keys) if keys else []
        return [json.loads(r) for r in raws if r]

    def children_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.pid).children()]

    def wait_ready(
        self, processes: int | None = None, timeout: float = 90.0, require_ready: bool = True
    ) -> list[dict[str, Any]]:
        """Block until ``processes`` pool processes have published a (ready) snapshot."""
        want = processes or self.concurrency

        def check() -> list[dict[str, Any]] | None:
            if not self.alive():
                raise RuntimeError(
                    f"worker exited ({self.proc and self.proc.returncode}):\n" + self.log()[-3000:]
                )
            snaps = [s for s in self.snapshots() if s.get("node") == self.node]
            done = [s for s in snaps if s["ready"] or not require_ready]
            if len(done) >= want:
                return snaps
            seen.clear()
            seen.extend(s["not_ready_reasons"] for s in snaps if not s["ready"])
            return None

        seen: list[Any] = []
        try:
            return wait_for(check, timeout, f"{want} pool processes of {self.node}", 0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; not-ready reasons: {seen}") from None

    def app(self) -> Celery:
        """A client that knows only the broker, the queue and task names (on RabbitMQ, also
        the arguments the workers declare their queues with: harness.brokers)."""
        from harness.brokers import QUEUE_ARGUMENTS

        app = Celery(broker=self.broker_url, backend=self.redis_url)
        if self.broker_url.startswith("amqp"):
            from kombu import Exchange, Queue

            q = self.queue
            app.conf.task_queues = [
                Queue(q, Exchange(q), routing_key=q, queue_arguments=QUEUE_ARGUMENTS)
            ]
        app.conf.update(
            task_default_queue=self.queue,
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
        )
        return app

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- toy models and manifests --------------------------------------------------------------------
def build_kmeans(path: Path, n_features: int = 3, k: int = 3) -> Path:
    """A StandardScaler + KMeans pipeline fitted on seeded random data, saved with joblib."""
    import joblib
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(0).normal(size=(200, n_features))
    pipe = Pipeline(
        [("scale", StandardScaler()), ("kmeans", KMeans(n_clusters=k, n_init=2, random_state=0))]
    ).fit(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipe, path)
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_manifest(folder: Path, entries: list[dict[str, Any]], *, hash_paths: bool = True) -> Path:
    """Write ``folder/models.toml``; entries with a path and no sha256 get the real one."""
    lines = []
    for entry in entries:
        entry = dict(entry)
        options = entry.pop("options", None)
        if hash_paths and entry.get("path") and "sha256" not in entry:
            target = folder / entry["path"]
            if target.exists():
                entry["sha256"] = artifact_sha256(target)
        lines.append("[[model]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        if options:
            lines.append("[model.options]")
            lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
        lines.append("")
    path = folder / "models.toml"
    path.write_text("\n".join(lines))
    return path
