"""What loads the workers: ``Client`` (one task at a time), ``Driver`` (N in flight, processes)."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import uuid
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from bench.helper import Closing, JsonProc, clean_env, serve
from bench.run import med, pct

Jobs = list[tuple[list[Any], dict[str, Any]]]  # (args, kwargs) of each task


def release(app: Any, result: Any) -> None:
    """Drop a finished AsyncResult now, while Redis is up (at exit its ``__del__`` would retry)."""
    with suppress(Exception):
        app.backend.remove_pending_result(result)
    result.backend = None  # nothing left for __del__ to cancel


class Client(Closing):
    """A plain Celery client (what a web app uses): ``send_task(...).get()``."""

    def __init__(self, worker: Any) -> None:
        self.worker, self.app = worker, worker.app()

    def call(self, name: str, args: list[Any], kwargs: Any = None, timeout: float = 120) -> Any:
        """(ms from the send to the answer, the answer)."""
        t0 = time.perf_counter()
        result = self.app.send_task(name, args=args, kwargs=kwargs or {})
        try:
            value = result.get(timeout=timeout)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            release(self.app, result)
        return ms, value

    def warm(self) -> None:
        """Connect and subscribe without a task: a web app's client is long-lived (not measured)."""
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)
            producer.maybe_declare(self.app.amqp.queues[self.app.conf.task_default_queue])
        self.app.backend.client.ping()
        result = self.app.AsyncResult(uuid.uuid4().hex)
        with suppress(Exception):  # nobody runs it: only the subscription matters
            result.get(timeout=0.05)
        release(self.app, result)

    def sequential(self, name: str, jobs: Jobs, n: int) -> list[float]:
        return [self.call(name, *jobs[i % len(jobs)])[0] for i in range(n)]

    def close(self) -> None:
        from harness import close_app

        close_app(self.app)


def alternate(
    ctx: Any, calls: dict[str, tuple[Client, str]], jobs: Any, rounds: int, n: int
) -> dict[str, list[list[float]]]:
    """name -> ms of each round's ``n`` calls, names alternating; ``jobs``: shared, or by name."""
    each = jobs if isinstance(jobs, dict) else dict.fromkeys(calls, jobs)
    for name, (client, task) in calls.items():
        client.sequential(task, each[name], 5)
    out: dict[str, list[list[float]]] = {name: [] for name in calls}
    for _, (name, (client, task)) in itertools.product(range(rounds), calls.items()):
        out[name].append(ctx.measure(partial(client.sequential, task, each[name], n)))
    return out


def drive(app: Any, pubsub: Any, task: str, jobs: list[Any], **run: Any) -> dict[str, Any]:
    """Keep ``inflight`` of ``total`` in flight; other drivers' results skipped by channel name."""
    total, inflight, prefix = run["total"], run["inflight"], len(b"celery-task-meta-")
    sent: dict[str, float] = {}
    latencies, failures, next_i = [], [], 0
    with app.producer_pool.acquire(block=True) as producer:

        def send() -> None:
            nonlocal next_i
            sent[task_id := uuid.uuid4().hex] = time.perf_counter()
            app.send_task(task, args=jobs[next_i % len(jobs)], task_id=task_id, producer=producer)
            next_i += 1

        while time.time() < run["start_at"]:
            time.sleep(0.002)
        t_start, stop = time.time(), time.monotonic() + run["timeout"]
        for _ in range(min(inflight, total)):
            send()
        while len(latencies) < total:
            if time.monotonic() > stop:
                raise TimeoutError(f"{len(latencies)}/{total} results after {run['timeout']} s")
            if not (msg := pubsub.get_message(timeout=1.0)) or msg.get("type") != "pmessage":
                continue
            if (task_id := msg["channel"][prefix:].decode()) not in sent:
                continue
            if (body := json.loads(msg["data"])).get("status") not in ("SUCCESS", "FAILURE"):
                continue
            latencies.append((time.perf_counter() - sent.pop(task_id)) * 1000)
            if body["status"] == "FAILURE":
                failures.append(str(body.get("result"))[:200])
            if next_i < total:
                send()
    return {"t_start": t_start, "t_end": time.time(), "latencies": latencies, "failures": failures}


class Driver(Closing):
    """``k`` driver processes sharing each run, from the first send to the last answer of any."""

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
        self, task: str, jobs: list[Any], total: int, inflight: int, timeout: float = 300
    ) -> dict[str, Any]:
        """Send ``total`` tasks (args cycling through ``jobs``), ``inflight`` at a time."""
        k, start_at = max(1, min(len(self.procs), inflight, total)), time.time() + 0.2
        for i, p in enumerate(self.procs[:k]):
            share = {"total": total // k + (i < total % k), "jobs": jobs[i::k] or jobs}
            share |= {"inflight": inflight // k + (i < inflight % k), "start_at": start_at}
            p.send({"cmd": "run", "task": task, "timeout": timeout, **share})
        answers = [p.read(timeout + 15) for p in self.procs[:k]]
        if bad := [a.get("error") for a in answers if not a.get("ok")]:
            raise RuntimeError(f"driver failed: {bad}")
        lat = [x for a in answers for x in a["latencies"]]
        failures = [f for a in answers for f in a["failures"]]
        seconds = max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers)
        out = dict(seconds=round(seconds, 4), tasks=total, tasks_per_s=round(total / seconds, 1))
        out |= dict(inflight=inflight, drivers=k, failures=failures[:20], failed=len(failures))
        return out | dict(p50_ms=round(med(lat), 3), p99_ms=round(pct(lat, 99), 3))

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
    handle = partial(drive, app, pubsub)  # the one command: run
    return serve({"ok": True, "pid": os.getpid()}, lambda cmd, **run: handle(**run) if run else {})


if __name__ == "__main__":
    raise SystemExit(main())
