"""Shared tools of the fault-injection tests: a client that reads results the way any web app
does (the raw JSON under ``celery-task-meta-<id>``), task counting, and the tally each test prints.

Counting, per test:

* sent: task ids published by the test;
* completed: ids whose stored result is SUCCESS (exactly one final result per id: the backend
  keeps one record per id, so "completed" counts distinct ids);
* deliveries: ``Task NAME[id] received`` lines in the worker logs (one per delivery);
* redelivered: deliveries minus the distinct ids delivered (a task handed to a worker again after
  a pool process or node died, or after a Redis restore);
* duplicated: ``Task NAME[id] succeeded`` lines minus the ids that succeeded, i.e. tasks whose body
  ran to completion more than once (an at-least-once duplicate, visible as a side effect);
* lost: sent minus completed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from harness import WorkerProcess, build_kmeans, wait_for, write_manifest
from harness.brokers import Broker

FINAL = ("SUCCESS", "FAILURE", "REVOKED")
LOG_LINE = re.compile(r"Task ([\w.]+)\[([0-9a-f-]{36})\] (received|succeeded)")
SERVING = re.compile(r"registry of pid (\d+): READY")
TALLY_FILE = Path(
    os.environ.get("RELIABILITY_TALLY_FILE")
    or Path(tempfile.gettempdir()) / "modelworkers-reliability.jsonl"
)


class Misbehaviour(AssertionError):
    """The behaviour a strict-xfail test asserts did not happen: a known product bug. Those
    tests mark only this exception as expected (``xfail(raises=Misbehaviour)``), so that a
    broken precondition still fails them."""


def ready_pool_pids(worker: WorkerProcess) -> set[int]:
    """Pids of the pool processes that logged a READY registry table: each serving process
    does, whether it loaded its models (PRELOAD_MODE=child) or inherited them from the parent
    (parent), in which case the parent's own table is left out."""
    return {int(p) for p in SERVING.findall(worker.log())} - {worker.pid}


def seg_manifest(folder: Path) -> Path:
    """A manifest of one small scikit-learn model ``seg`` (3 features): for the tests about
    nodes, brokers and queues rather than models, where a fast start matters."""
    build_kmeans(folder / "seg.joblib")
    return write_manifest(folder, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}])


def client_app(redis_url: str, queue: str, broker: Broker | None = None) -> Celery:
    """A publisher that knows only the broker, the queue and task names (no result backend:
    results are read from Redis directly, as a web app in any language would). ``broker``:
    the test's broker (RabbitMQ, or by default the Redis at ``redis_url``)."""
    broker = broker or Broker("redis")
    app = Celery(broker=broker.url(redis_url), backend="disabled://")
    app.conf.update(broker.client_conf(queue))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
    )
    return app


def meta_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


def read_results(client: redis.Redis, ids: list[str], chunk: int = 1000) -> dict[str, Any]:
    """id -> stored result (status, result, ...) for every id that has one."""
    out: dict[str, Any] = {}
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        for task_id, raw in zip(part, client.mget([meta_key(i) for i in part]), strict=True):
            if raw:
                out[task_id] = json.loads(raw)
    return out


def statuses(client: redis.Redis, ids: list[str]) -> Counter[str]:
    results = read_results(client, ids)
    return Counter(results[i]["status"] if i in results else "MISSING" for i in ids)


def wait_final(
    client: redis.Redis,
    ids: list[str],
    timeout: float,
    what: str = "every task to finish",
    interval: float = 0.2,
) -> dict[str, Any]:
    """Block (bounded) until every id has a final state; returns id -> result."""
    pending = set(ids)
    done: dict[str, Any] = {}

    def check() -> bool:
        try:
            found = read_results(client, sorted(pending))
        except redis.ConnectionError:
            return False
        for task_id, res in found.items():
            if res["status"] in FINAL:
                done[task_id] = res
                pending.discard(task_id)
        return not pending

    try:
        wait_for(check, timeout, what, interval=interval)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; {len(pending)} of {len(ids)} not final") from None
    return done


def queue_drained(client: redis.Redis, queue: str, broker: Broker | None = None) -> bool:
    """No message left in the queue and none delivered but unacknowledged."""
    return (broker or Broker("redis")).queue_empty(client, queue)


def log_counts(workers: Iterable[WorkerProcess], ids: Iterable[str]) -> tuple[Counter[str], ...]:
    """(received, succeeded) per task id, from the worker logs."""
    wanted = set(ids)
    received: Counter[str] = Counter()
    succeeded: Counter[str] = Counter()
    for worker in workers:
        for _, task_id, what in LOG_LINE.findall(worker.log()):
            if task_id in wanted:
                (received if what == "received" else succeeded)[task_id] += 1
    return received, succeeded


@dataclass
class Tally:
    """What one fault test observed: printed, and appended to TALLY_FILE."""

    test: str
    sent: int
    completed: int
    failed: int = 0
    deliveries: int = 0
    redelivered: int = 0
    duplicated: int = 0
    lost: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def count(
        cls,
        test: str,
        ids: list[str],
        results: dict[str, Any],
        workers: Iterable[WorkerProcess],
        started: float,
        **extra: Any,
    ) -> Tally:
        received, succeeded = log_counts(list(workers), ids)
        ok = [i for i in ids if results.get(i, {}).get("status") == "SUCCESS"]
        failed = [i for i in ids if results.get(i, {}).get("status") == "FAILURE"]
        deliveries = sum(received.values())
        return cls(
            test=test,
            sent=len(ids),
            completed=len(set(ok)),
            failed=len(failed),
            deliveries=deliveries,
            redelivered=deliveries - len(received),
            duplicated=sum(succeeded.values()) - len(succeeded),
            lost=len(ids) - len(set(ok)) - len(failed),
            seconds=round(time.monotonic() - started, 1),
            extra=extra,
        )

    def report(self) -> Tally:
        line = json.dumps(asdict(self), sort_keys=True)
        print(f"\nRELIABILITY {line}")
        with TALLY_FILE.open("a") as fh:
            fh.write(line + "\n")
        return self
