"""``make chaos``: every fault at once, under a mixed load of every task family.

``python -m harness.chaos [--broker redis|amqp] [--seconds 180] [--rate 20] [--out PATH]``
starts a real ``redis-server`` as docker-compose.yml runs it (AOF, ``appendfsync everysec``;
``harness.durable``) in a temporary folder, two
worker nodes (prefork, 2 processes each) on one queue (in that Redis, or with ``--broker amqp`` in a
RabbitMQ virtual host of the run's own, created and deleted with ``rabbitmqctl``; results and
the registry stay in the Redis), and a client that keeps sending every task family at
``--rate`` tasks per second (with a few invalid requests, which must fail with ``InvalidInput``).
Meanwhile, on a fixed timeline, it

* SIGKILLs pool processes (five, at two moments),
* SIGKILLs a whole node and starts it again,
* restarts Redis (SIGTERM, then a new server on the same data: the AOF brings queues, unacked
  messages and results back),
* runs a fleet reload (``modelworkers reload sentiment --version 1.1.0``) and a reload that fails
  to load (a version whose artifact is corrupt: every process keeps the version it had),
* publishes hostile raw messages (not JSON, too deep, too large, wrong content type, no task):
  onto the Redis queue list, or with kombu's producer to RabbitMQ, bytes and headers as given.

Then it stops sending, waits (bounded) for every task's final state and prints, per outcome:
sent, completed, failed with their reasons (expected: the invalid requests), lost, executed twice
(a body that ran to completion more than once, from the worker logs). It exits 1 if any task is
lost or failed unexpectedly. Every process it starts is stopped by PID. Not part of the wheel.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from harness import ROOT, WorkerProcess, build_kmeans, close_app, wait_for
from harness.brokers import QUEUE_ARGUMENTS, Broker, RabbitVhost, rabbitmq_problem
from harness.durable import DurableRedis
from shared.manifest import artifact_sha256

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
SUCCEEDED = re.compile(r"Task [\w.]+\[([0-9a-f-]{36})\] succeeded")
REFUSED = re.compile(
    r"refused \S*\[[^\]]*\] (?:by the consumer|at the transport): InvalidMessage|unregistered task"
)
TEXTS = [
    "the service was quick and the staff were lovely",
    "a dull, slow and disappointing evening",
    "I would happily come back here again",
    "the package arrived broken and nobody answered",
]
SEGMENT_ROWS = [[12.0, 4.0, 310.5, 18.0], [200.0, 1.0, 20.0, 3.0]]
ROWS = [[(i * 7) % 10 / 10, (i * 3) % 10 / 10, (i % 4) / 4] for i in range(60)]
YEARLY = {"y": [900 + 150 * ((i * 37) % 11) / 11 + (i % 7) * 5 for i in range(60)]}
DAILY = {
    "ds": [f"2024-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in range(56)],
    "y": [10 + 0.05 * i + (2.0 if i % 7 in (5, 6) else 0.0) for i in range(56)],
}


def job_mix(rng: random.Random) -> tuple[str, list[Any], dict[str, Any], str]:
    """(task, args, kwargs, expected): one request of the mixed load; expected is "ok" or the
    error type it must fail with."""
    text = rng.choice(TEXTS)
    jobs: list[tuple[int, tuple[str, list[Any], dict[str, Any], str]]] = [
        (30, ("sentiment.analyze", [text], {}, "ok")),
        (5, ("sentiment.analyze_batch", [TEXTS], {}, "ok")),
        (10, ("models.predict", ["sentiment", text], {}, "ok")),
        (6, ("models.predict", ["chaos_segments", [[0.1, 0.5, 0.9]]], {}, "ok")),
        (6, ("clustering.assign", [SEGMENT_ROWS], {}, "ok")),
        (3, ("clustering.fit", [ROWS, 3], {}, "ok")),
        (3, ("forecast.arima", [YEARLY, 3], {"order": [1, 1, 1]}, "ok")),
        (1, ("forecast.prophet", [DAILY, 3], {"frequency": "D"}, "ok")),
        (3, ("forecast.predict", ["co2_prophet", 6], {}, "ok")),
        (3, ("sentiment.analyze", [12345], {}, "InvalidInput")),
    ]
    total = sum(w for w, _ in jobs)
    pick = rng.uniform(0, total)
    for weight, job in jobs:
        pick -= weight
        if pick <= 0:
            return job
    return jobs[0][1]


# ---- the pieces ---------------------------------------------------------------------------
@dataclass
class Sent:
    task_id: str
    name: str
    expected: str


@dataclass
class Run:
    """What happened: the requests sent, the fault timeline, the publish failures."""

    t0: float = field(default_factory=time.monotonic)
    sent: list[Sent] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    publish_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, what: str, **details: Any) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 1), "event": what, **details}
        with self.lock:
            self.events.append(entry)
        print(f"[chaos {entry['t']:6.1f} s] {what} {json.dumps(details) if details else ''}")


def client_app(broker: str, queue: str) -> Celery:
    """A publisher that knows only the broker, the queue and the task names; results are read
    from Redis directly."""
    app = Celery(broker=broker, backend="disabled://")
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


def send_load(app: Celery, run: Run, rate: float, stop: threading.Event, seed: int) -> None:
    """Keep sending the mixed load until ``stop``; a publish that fails (Redis restarting) is
    retried with the same task id for up to 60 s."""
    rng = random.Random(seed)
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        name, args, kwargs, expected = job_mix(rng)
        task_id = str(uuid.uuid4())
        deadline = time.monotonic() + 60
        while True:
            try:
                app.send_task(name, args, kwargs, task_id=task_id, retry=False)
                break
            except Exception:
                run.publish_retries += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with run.lock:
            run.sent.append(Sent(task_id, name, expected))
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def repository(folder: Path) -> Path:
    """The shipped models, plus ``chaos_segments``: version 1.0.0 serves, 2.0.0 is corrupt
    (its hash matches, its content does not load)."""
    repo = folder / "models"
    repo.mkdir()
    for model in (ROOT / "models").iterdir():
        if (model / "model.toml").exists():
            (repo / model.name).symlink_to(model, target_is_directory=True)
    seg = repo / "chaos_segments"
    seg.mkdir()
    build_kmeans(seg / "1.0.0.joblib", n_features=3)
    (seg / "2.0.0.joblib").write_bytes(b"this is not a joblib file")
    (seg / "model.toml").write_text(
        'family = "sklearn"\ndefault_version = "1.0.0"\n\n'
        + "".join(
            f'[[versions]]\nversion = "{v}"\npath = "{v}.joblib"\n'
            f'sha256 = "{artifact_sha256(seg / f"{v}.joblib")}"\n\n'
            for v in ("1.0.0", "2.0.0")
        )
    )
    return repo


def hostile_messages(queue: str) -> list[bytes]:
    """Raw envelopes as a hostile client pushes them onto the queue list."""

    def envelope(body: bytes, headers: Any, content_type: str = "application/json") -> bytes:
        return json.dumps(
            {
                "body": base64.b64encode(body).decode(),
                "content-encoding": "utf-8",
                "content-type": content_type,
                "headers": headers,
                "properties": {
                    "delivery_tag": str(uuid.uuid4()),
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "body_encoding": "base64",
                },
            }
        ).encode()

    def headers(task: str = "sentiment.analyze") -> dict[str, Any]:
        task_id = str(uuid.uuid4())
        return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0}

    deep = ("[" * 5000 + '"x"' + "]" * 5000).encode()
    return [
        b"{not json at all",
        envelope(b'[["ok"], {}, {}', headers()),  # body not JSON
        envelope(b"[[" + deep + b"], {}, {}]", headers()),  # 5,000 levels deep
        envelope(b"\x80\x04K\x01.", headers(), content_type="application/x-python-serialize"),
        envelope(json.dumps([["a" * (17 << 20)], {}, {}]).encode(), headers()),  # > 16 MiB
        envelope(json.dumps([["hi"], {}, {}]).encode(), {"id": str(uuid.uuid4())}),  # no task
        envelope(json.dumps([["hi"], {}, {}]).encode(), headers("no.such.task")),
    ]


def modelworkers(env: dict[str, str], *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run the CLI as an admin would; its JSON answer and exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = {"stdout": proc.stdout[-500:], "stderr": proc.stderr[-500:]}
    return {"rc": proc.returncode, "answer": answer}


# ---- the run ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=180, help="how long the load runs")
    parser.add_argument("--rate", type=float, default=20, help="tasks sent per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--broker", choices=("redis", "amqp"), default="redis", help="where the tasks queue"
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "chaos.json")
    opts = parser.parse_args(argv)

    vhost: RabbitVhost | None = None
    if opts.broker == "amqp":
        problem = rabbitmq_problem()
        if problem:
            raise SystemExit(f"--broker amqp needs RabbitMQ: {problem}")
        vhost = RabbitVhost.create()
    folder = Path(tempfile.mkdtemp(prefix="modelworkers-chaos-"))
    server = DurableRedis(folder)
    server.start()
    repo = repository(folder)
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    env = {
        "MODELWORKERS_MODEL_REPOSITORY": str(repo),
        # a dead node's tasks come back within the run (the task time limit must stay below)
        "MODELWORKERS_VISIBILITY_TIMEOUT_SECONDS": "40",
        "MODELWORKERS_TASK_TIME_LIMIT_SECONDS": "30",
        "PYTHONUNBUFFERED": "1",
        **({"MODELWORKERS_BROKER_URL": vhost.url} if vhost is not None else {}),
    }
    nodes = [
        WorkerProcess(
            server.url, concurrency=2, env=env, log_dir=folder, prefix=prefix, node=f"{n}@chaos"
        )
        for n in ("alpha", "beta")
    ]
    run = Run()
    stop = threading.Event()
    rng = random.Random(opts.seed)
    app = client_app(vhost.url if vhost is not None else server.url, prefix)
    if vhost is not None:
        app.conf.update(Broker("amqp", vhost).client_conf(prefix))
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    cli_env = {**os.environ, **nodes[0].env}
    sender: threading.Thread | None = None
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready(2, timeout=180)
        run = Run()
        run.event("load starts", rate=opts.rate, seconds=opts.seconds)
        sender = threading.Thread(
            target=send_load, args=(app, run, opts.rate, stop, opts.seed), daemon=True
        )
        sender.start()

        def kill_pool_processes(count: int) -> None:
            for _ in range(count):
                node = rng.choice([n for n in nodes if n.alive()])
                children = node.children_pids()
                if children:
                    victim = rng.choice(children)
                    with suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                    run.event("SIGKILL pool process", node=node.node, pid=victim)
                time.sleep(3)

        def kill_and_restart_node() -> None:
            node = nodes[1]
            node.kill()
            run.event("SIGKILL node", node=node.node)
            time.sleep(8)
            node.start()
            node.wait_ready(2, timeout=180)
            run.event("node back READY", node=node.node)

        def restart_redis() -> None:
            t = time.monotonic()
            server.stop()
            run.event("Redis stopped (SIGTERM, AOF flushed)")
            time.sleep(2)
            server.start()
            run.event("Redis back", down_s=round(time.monotonic() - t, 1))

        def reloads() -> None:
            ok = modelworkers(cli_env, "reload", "sentiment", "--version", "1.1.0")
            run.event("fleet reload sentiment 1.1.0", rc=ok["rc"], replies=_replies(ok))
            bad = modelworkers(cli_env, "reload", "chaos_segments", "--version", "2.0.0")
            run.event("reload to a corrupt version", rc=bad["rc"], replies=_replies(bad))

        def hostile() -> None:
            if vhost is not None:
                publish_raw_amqp(vhost.url, prefix)
            else:
                for raw in hostile_messages(prefix):
                    client.lpush(prefix, raw)
            run.event("hostile messages pushed", count=len(hostile_messages(prefix)))

        timeline: list[tuple[float, Callable[[], None]]] = [
            (0.08, lambda: kill_pool_processes(3)),
            (0.20, kill_and_restart_node),
            (0.42, restart_redis),
            (0.55, reloads),
            (0.68, hostile),
            (0.78, lambda: kill_pool_processes(2)),
        ]
        for at, fault in timeline:
            delay = run.t0 + at * opts.seconds - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            try:
                fault()
            except Exception as exc:  # a fault that could not be injected is reported
                run.event("fault failed", error=f"{type(exc).__name__}: {exc}")
        remaining = run.t0 + opts.seconds - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        stop.set()
        sender.join(timeout=70)
        run.event("load stops", sent=len(run.sent))
        report = settle(run, client, nodes)
    finally:
        stop.set()
        close_app(app)
        for node in nodes:
            node.stop()
        server.stop()
        client.close()
        if vhost is not None:
            vhost.delete()
    report["broker"] = opts.broker
    report["events"] = run.events
    report["logs"] = str(folder)
    opts.out.write_text(json.dumps(report, indent=1))
    print_report(report)
    print(f"raw: {opts.out}; logs: {folder}")
    hostile_ok = report["hostile_refused"] >= len(hostile_messages(prefix))
    return 1 if report["lost"] or report["unexpected_failures"] or not hostile_ok else 0


def publish_raw_amqp(url: str, queue: str) -> None:
    """The hostile messages' bodies, headers and content types, published to RabbitMQ by
    kombu's producer with no serializer in the way (an envelope has no AMQP equivalent: the
    first one, not JSON at all, goes as a body without headers)."""
    from kombu import Connection, Exchange, Queue

    target = Queue(queue, Exchange(queue), routing_key=queue, queue_arguments=QUEUE_ARGUMENTS)
    with Connection(url) as conn:
        producer = conn.Producer()
        for raw in hostile_messages(queue):
            try:
                envelope = json.loads(raw)
            except ValueError:
                body, headers, content_type = raw, {}, "application/json"
            else:
                body = base64.b64decode(envelope["body"])
                headers, content_type = envelope["headers"], envelope["content-type"]
            producer.publish(
                body,
                exchange=target.exchange,
                routing_key=queue,
                declare=[target],
                headers=headers,
                content_type=content_type,
                content_encoding="utf-8",
            )


def _replies(result: dict[str, Any]) -> Any:
    answer = result["answer"]
    replies = answer.get("replies") if isinstance(answer, dict) else None
    if isinstance(replies, list):
        counts = dict(Counter("ok" if r.get("ok") else "failed" for r in replies))
        return {**counts, "missing": len(answer.get("missing") or [])}
    return answer


def settle(run: Run, client: redis.Redis, nodes: list[WorkerProcess]) -> dict[str, Any]:
    """Wait (bounded) for every sent task's final state, then count."""
    ids = [s.task_id for s in run.sent]
    results: dict[str, Any] = {}

    def read() -> bool:
        pending = [i for i in ids if i not in results]
        for start in range(0, len(pending), 1000):
            part = pending[start : start + 1000]
            with suppress(redis.RedisError):
                for task_id, raw in zip(
                    part, client.mget([f"celery-task-meta-{i}" for i in part]), strict=True
                ):
                    if raw and json.loads(raw)["status"] in FINAL:
                        results[task_id] = json.loads(raw)
        return len(results) == len(ids)

    with suppress(TimeoutError):
        wait_for(read, 150, "every task's final state", interval=1.0)
    logs = "".join(node.log() for node in nodes)
    succeeded = Counter(SUCCEEDED.findall(logs))
    refused = len(REFUSED.findall(logs))
    completed = failed_expected = 0
    reasons: Counter[str] = Counter()
    unexpected: list[dict[str, Any]] = []
    lost: list[dict[str, Any]] = []
    for sent in run.sent:
        res = results.get(sent.task_id)
        if res is None:
            lost.append({"id": sent.task_id, "task": sent.name})
        elif res["status"] == "SUCCESS" and sent.expected == "ok":
            completed += 1
        else:
            error = res.get("result") or {}
            kind = error.get("exc_type", res["status"]) if isinstance(error, dict) else "?"
            message = str(error.get("exc_message", "")) if isinstance(error, dict) else ""
            reasons[f"{sent.name}: {kind}"] += 1
            if kind == sent.expected:
                failed_expected += 1
            else:
                unexpected.append(
                    {"id": sent.task_id, "task": sent.name, "error": kind, "message": message[:200]}
                )
    return {
        "sent": len(run.sent),
        "completed": completed,
        "failed_expected": failed_expected,
        "failure_reasons": dict(reasons),
        "unexpected_failures": unexpected,
        "lost": len(lost),
        "lost_tasks": lost[:20],
        "executed_twice": sum(1 for n in succeeded.values() if n > 1),
        "hostile_refused": refused,
        "publish_retries": run.publish_retries,
        "by_task": dict(Counter(s.name for s in run.sent)),
    }


def print_report(report: dict[str, Any]) -> None:
    print("\nmodelworkers chaos run")
    for event in report["events"]:
        details = {k: v for k, v in event.items() if k not in ("t", "event")}
        print(f"  {event['t']:6.1f} s  {event['event']}  {json.dumps(details) if details else ''}")
    print(
        f"  sent {report['sent']}, completed {report['completed']}, "
        f"failed as expected {report['failed_expected']}, "
        f"failed unexpectedly {len(report['unexpected_failures'])}, lost {report['lost']}, "
        f"executed twice {report['executed_twice']}; hostile messages refused "
        f"{report['hostile_refused']}"
    )
    for reason, count in sorted(report["failure_reasons"].items()):
        print(f"    failed: {reason} x{count}")
    for failure in report["unexpected_failures"][:10]:
        print(f"    unexpected: {failure}")


if __name__ == "__main__":
    sys.exit(main())
