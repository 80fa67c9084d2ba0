"""Section 6, reload under load: two nodes x 2 pool processes, a steady stream of
sentiment.analyze, ``python -m workers.cli reload sentiment --version V --wait --json``."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Any

from bench.context import Ctx, med, pct, rnd
from bench.data import REAL_MODELS, ROOT, texts
from bench.driver import Client
from bench.report import target
from harness import wait_for


class Stream:
    """A steady stream of sentiment.analyze: ``inflight`` threads of one standard Celery client
    (its result backends are per thread), each sending one task and waiting for it, recording
    (sent, answered, outcome, answer) of every task.

    One task per thread at a time on purpose: collecting several results in order with
    ``AsyncResult.get()`` makes the Redis result consumer wait a full 1 s drain interval for a
    result that had already arrived (it drains before it checks), which would show up here as
    1 s latencies that the workers did not cause."""

    def __init__(self, worker: Any, inflight: int = 4) -> None:
        self.client, self.stop = Client(worker), threading.Event()
        self.events: list[tuple[float, float, str, dict[str, Any] | None]] = []
        self.threads = [
            threading.Thread(target=self.run, args=(k, inflight), daemon=True)
            for k in range(inflight)
        ]

    def run(self, slot: int, inflight: int) -> None:
        corpus = texts()
        for i in itertools.count(slot, inflight):
            if self.stop.is_set():
                return
            t_sent, text = time.time(), corpus[i % len(corpus)]
            try:
                outcome, value = "ok", self.client.call("sentiment.analyze", [text], timeout=60)[1]
            except Exception as exc:
                outcome, value = f"{type(exc).__name__}: {exc}", None
            self.events.append((t_sent, time.time(), outcome, value))

    def __enter__(self) -> Stream:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.events) >= 8, 60, "the task stream to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        self.client.close()


class ReplyWatch(threading.Thread):
    """Subscribes to the control channel, catches the reload request (its ``sent_at``), then
    polls its reply list every 10 ms: seconds from the request's publication to each reply."""

    def __init__(self, worker: Any, expected: int) -> None:
        super().__init__(daemon=True)
        from shared.reload import channel

        self.client = worker.client
        self.prefix = worker.prefix
        self.expected = expected
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel(self.prefix))
        self.result: dict[str, Any] = {}
        self.done = threading.Event()

    def run(self) -> None:
        from shared.reload import reply_key

        try:
            request = None
            deadline = time.monotonic() + 120
            while request is None and time.monotonic() < deadline:
                msg = self.pubsub.get_message(timeout=0.5)
                if msg and msg.get("type") == "message":
                    request = json.loads(msg["data"])
            if request is None:
                return
            received = time.time()
            key = reply_key(self.prefix, request["id"])
            times: list[float] = []
            while len(times) < self.expected and time.monotonic() < deadline:
                n = self.client.llen(key)
                while len(times) < n:
                    times.append(time.time() - request["sent_at"])
                time.sleep(0.01)
            self.result = {
                "id": request["id"],
                "sent_at": request["sent_at"],
                "seen_by_watcher_s": received - request["sent_at"],
                "reply_s": times,
            }
        finally:
            self.pubsub.close()
            self.done.set()


def reload_once(alpha: Any, version: str) -> dict[str, Any]:
    watch = ReplyWatch(alpha, expected=4)
    watch.start()
    t0 = time.time()
    cli = [sys.executable, "-m", "workers.cli", "reload", "sentiment", "--version", version]
    done = subprocess.run(
        [*cli, "--wait", "--json"],
        cwd=ROOT,
        env=alpha.env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    t1 = time.time()
    watch.done.wait(30)
    try:
        outcome = json.loads(done.stdout)
    except json.JSONDecodeError:
        outcome = {"ok": False, "unparsed": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    return {
        "version": version,
        "cli_rc": done.returncode,
        "cli_started": t0,
        "cli_wall_s": t1 - t0,
        "send_to_all_replies_s": max(watch.result["reply_s"])
        if watch.result.get("reply_s") and len(watch.result["reply_s"]) >= 4
        else None,
        "watch": watch.result,
        "ok": outcome.get("ok"),
        "replies": [
            {
                "node": r["node"],
                "pid": r["pid"],
                "ok": r["ok"],
                "seconds": [x.get("seconds") for x in r["results"]],
                "old": [x.get("old_version") for x in r["results"]],
                "new": [x.get("new_version") for x in r["results"]],
            }
            for r in outcome.get("replies", [])
        ],
        "missing": outcome.get("missing"),
        "t_end": t1,
    }


def run(ctx: Ctx) -> dict[str, Any]:
    reps = ctx.n(3, 1)
    prefix = f"mwbench-fleet-{uuid.uuid4().hex[:6]}"
    env = {"MODEL_REPOSITORY": str(REAL_MODELS)}
    raw: dict[str, Any] = {"reloads": []}
    nodes = [
        ctx.worker(concurrency=2, env=env, prefix=prefix, node=f"{n}@{prefix}")
        for n in ("alpha", "beta")
    ]
    alpha = nodes[0]
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(ctx.running(node, wait=False))
        for node in nodes:
            ctx.ready(node, timeout=240)
        with Stream(alpha, inflight=4) as stream:
            time.sleep(1.0)
            for version in ["1.1.0", "1.0.0", "1.1.0"][:reps]:
                before = len(stream.events)
                rec = reload_once(alpha, version)
                served = len(stream.events)
                wait_for(lambda s=served: len(stream.events) >= s + 16, 60, "tasks after reload")
                rec["tasks_during"] = served - before
                raw["reloads"].append(rec)
                time.sleep(1.0)
        events = stream.events
    failed = [e for e in events if e[2] != "ok"]
    fallback = [e for e in events if e[3] is not None and e[3].get("fallback")]
    windows = [(r["cli_started"], r["t_end"]) for r in raw["reloads"]]
    in_window = [e for e in events if any(a <= e[1] and e[0] <= b for a, b in windows)]
    out_window = [e for e in events if e not in in_window]
    lat_in = [(e[1] - e[0]) * 1000 for e in in_window if e[2] == "ok"]
    lat_out = [(e[1] - e[0]) * 1000 for e in out_window if e[2] == "ok"]
    versions_seen = sorted({e[3]["version"] for e in events if e[3]})
    raw["slowest_ms"] = sorted(((e[1] - e[0]) * 1000 for e in events), reverse=True)[:10]
    raw["stream"] = {
        "tasks": len(events),
        "failed": [e[2] for e in failed][:20],
        "fallback_answers": len(fallback),
        "versions_seen": versions_seen,
        "tasks_in_reload_windows": len(in_window),
    }
    all_ok = all(r["ok"] and r["cli_rc"] == 0 and len(r["replies"]) == 4 for r in raw["reloads"])
    send_all = [r["send_to_all_replies_s"] for r in raw["reloads"] if r["send_to_all_replies_s"]]
    summary = {
        "reloads (all 4 processes ok)": f"{sum(bool(r['ok']) for r in raw['reloads'])}"
        f"/{len(raw['reloads'])}",
        "send -> all four replies, s (median)": rnd(med(send_all), 2),
        "CLI wall time (incl. its start), s (median)": rnd(
            med([r["cli_wall_s"] for r in raw["reloads"]]), 2
        ),
        "per-process reload seconds (median)": rnd(
            med([s for r in raw["reloads"] for rep in r["replies"] for s in rep["seconds"] if s]), 2
        ),
        "stream tasks total / during reloads": f"{len(events)} / {len(in_window)}",
        "failed tasks": len(failed),
        "fallback answers": len(fallback),
        "latency p50/p99 ms during reloads": f"{med(lat_in):.1f} / {pct(lat_in, 99):.1f}",
        "latency p50/p99 ms otherwise": f"{med(lat_out):.1f} / {pct(lat_out, 99):.1f}",
    }
    targets = [
        target("failed tasks during reloads under load", float(len(failed)), 0, unit=" tasks"),
    ]
    if not all_ok:
        summary["reload problems"] = "see raw.reloads"
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "config": {"nodes": 2, "concurrency": 2, "stream_inflight": 4, "reloads": reps},
    }
