"""What loads the workers: ``Client`` (a web app's Celery client, one task at a time) and
``Driver`` (keeps N tasks in flight from driver processes, ``python -m bench.driver URL QUEUE``)."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from bench.helper import JsonProc, clean_env, serve
from bench.run import med, pct


def release(app: Any, result: Any) -> None:
    """Drop a finished AsyncResult from the client's pending results (and its pub/sub channel)
    now, while Redis is up: the backend otherwise keeps it until exit, when its ``__del__``
    retries a Redis that is gone for minutes."""
    with suppress(Exception):
        app.backend.remove_pending_result(result)
    result.backend = None  # nothing left for __del__ to cancel


class Client:
    """A plain Celery client (what a web app uses): ``send_task(...).get()``."""

    def __init__(self, worker: Any) -> None:
        self.worker, self.app = worker, worker.app()
        self.ids: list[str] = []  # task ids, in order (to find their runtimes in the log)

    def call(
        self, name: str, args: list[Any], kwargs: dict[str, Any] | None = None, timeout: float = 120
    ) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = self.app.send_task(name, args=args, kwargs=kwargs or {})
        self.ids.append(result.id)
        try:
            value = result.get(timeout=timeout)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            release(self.app, result)
        return ms, value

    def warm(self) -> None:
        """Open this client's broker connection, result-backend connection and result
        subscription without sending a task: a web app's client is long-lived, and the first
        task a worker serves should not be charged with the client's own cold start."""
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)
            queue = self.app.amqp.queues[self.app.conf.task_default_queue]
            producer.maybe_declare(queue)  # what the first publish to the queue does once
        self.app.backend.client.ping()
        result = self.app.AsyncResult(uuid.uuid4().hex)
        with suppress(Exception):  # nobody runs it: only the subscription matters
            result.get(timeout=0.05)
        release(self.app, result)

    def sequential(
        self, name: str, jobs: list[tuple[list[Any], dict[str, Any]]], n: int
    ) -> list[float]:
        return [self.call(name, *jobs[i % len(jobs)])[0] for i in range(n)]

    def timed(self, name: str, jobs: list[Any], n: int) -> tuple[list[float], list[str]]:
        """``n`` sequential calls: their latencies and task ids."""
        self.ids.clear()
        return self.sequential(name, jobs, n), list(self.ids)

    def close(self) -> None:
        from harness import close_app

        close_app(self.app)


def alternate(
    ctx: Any, calls: dict[str, tuple[Client, str]], jobs: list[Any], rounds: int, n: int
) -> dict[str, list[list[float]]]:
    """Sequential calls through several clients (workers side by side) in alternating blocks:
    name -> (client, task) -> ms of each round's ``n`` calls, after 5 unrecorded ones."""
    for client, task in calls.values():
        client.sequential(task, jobs, 5)
    out: dict[str, list[list[float]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (client, task) in calls.items():
            out[name].append(ctx.measure(partial(client.sequential, task, jobs, n)))
    return out


# ---- the driver ----------------------------------------------------------------------------------
def drive(
    app: Any,
    pubsub: Any,
    task: str,
    jobs: list[list[Any]],
    total: int,
    inflight: int,
    start_at: float = 0.0,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Keep ``inflight`` of ``total`` tasks in flight (args cycling through ``jobs``): Celery
    publishes, the results come from one pattern subscription to ``celery-task-meta-*`` (results
    of other drivers' tasks are skipped by channel name, without decoding)."""
    prefix = len(b"celery-task-meta-")
    sent: dict[str, float] = {}
    latencies: list[float] = []
    failures: list[str] = []
    next_i = done = 0
    producer = app.producer_pool.acquire(block=True)
    try:

        def send() -> None:
            nonlocal next_i
            task_id = uuid.uuid4().hex
            sent[task_id] = time.perf_counter()
            app.send_task(task, args=jobs[next_i % len(jobs)], task_id=task_id, producer=producer)
            next_i += 1

        while time.time() < start_at:
            time.sleep(0.002)
        t_start = time.time()
        for _ in range(min(inflight, total)):
            send()
        stop = time.monotonic() + timeout
        while done < total:
            if time.monotonic() > stop:
                raise TimeoutError(f"{done}/{total} results after {timeout} s")
            msg = pubsub.get_message(timeout=1.0)
            if not msg or msg.get("type") != "pmessage":
                continue
            task_id = msg["channel"][prefix:].decode()
            if task_id not in sent:
                continue
            body = json.loads(msg["data"])
            if body.get("status") not in ("SUCCESS", "FAILURE"):
                continue
            latencies.append((time.perf_counter() - sent.pop(task_id)) * 1000)
            if body["status"] == "FAILURE":
                failures.append(str(body.get("result"))[:200])
            done += 1
            if next_i < total:
                send()
        t_end = time.time()
    finally:
        producer.release()
    return {"t_start": t_start, "t_end": t_end, "latencies": latencies, "failures": failures}


class Driver:
    """``k`` driver processes sharing each run: ``inflight`` and ``total`` are split among them,
    they start together at a wall-clock instant, and a run lasts from the first send to the last
    answer of any of them. A process of its own, so that the orchestrator's threads and imports
    do not slow the load it generates."""

    def __init__(self, worker: Any, logs: Path, k: int = 1) -> None:
        self.procs: list[JsonProc] = []
        try:
            for i in range(k):
                args = ["-m", "bench.driver", worker.redis_url, worker.queue]
                self.procs.append(JsonProc(f"driver-{i}", args, clean_env(), logs))
            for p in self.procs:
                p.read(60)
        except BaseException:
            self.close()
            raise

    def run(
        self,
        task: str,
        jobs: list[list[Any]],
        total: int,
        inflight: int,
        *,
        drivers: int | None = None,
        timeout: float = 300,
    ) -> dict[str, Any]:
        """Send ``total`` tasks (args cycling through ``jobs``), ``inflight`` at a time."""
        k = max(1, min(drivers or len(self.procs), len(self.procs), inflight, total))
        start_at = time.time() + 0.2
        for i, p in enumerate(self.procs[:k]):
            share = {"total": total // k + (i < total % k), "jobs": jobs[i::k] or jobs}
            share["inflight"] = inflight // k + (i < inflight % k)
            p.send({"cmd": "run", "task": task, "start_at": start_at, "timeout": timeout, **share})
        answers = [p.read(timeout + 15) for p in self.procs[:k]]
        bad = [a.get("error") for a in answers if not a.get("ok")]
        if bad:
            raise RuntimeError(f"driver failed: {bad}")
        lat = [x for a in answers for x in a["latencies"]]
        seconds = max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers)
        failures = [f for a in answers for f in a["failures"]]
        return {
            "seconds": round(seconds, 4),
            "tasks": total,
            "tasks_per_s": round(total / seconds, 1),
            "inflight": inflight,
            "drivers": k,
            "failures": failures[:20],
            "failed": len(failures),
            "p50_ms": round(med(lat), 3),
            "p99_ms": round(pct(lat, 99), 3),
            "per_driver_s": [round(a["t_end"] - a["t_start"], 3) for a in answers],
        }

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            p.close()


def main(argv: list[str] | None = None) -> int:
    """One driver process: ``run`` commands (``drive``'s arguments), one at a time."""
    import redis
    from celery import Celery

    redis_url, queue = argv or sys.argv[1:]
    app = Celery(broker=redis_url)
    app.conf.update(task_default_queue=queue, task_serializer="json", accept_content=["json"])
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=False)
    pubsub.psubscribe("celery-task-meta-*")
    deadline = time.monotonic() + 20
    while (msg := pubsub.get_message(timeout=0.5)) is None or msg["type"] != "psubscribe":
        if time.monotonic() > deadline:
            raise TimeoutError("no psubscribe confirmation")

    def handle(cmd: str, **args: Any) -> dict[str, Any]:
        return drive(app, pubsub, **args) if cmd == "run" else {}

    return serve({"ok": True, "pid": os.getpid()}, handle)


if __name__ == "__main__":
    raise SystemExit(main())
