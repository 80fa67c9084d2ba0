"""Reload under load: ``modelworkers reload --wait`` on two nodes x 2 processes under a stream."""

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

from bench.data import REAL_MODELS, ROOT, texts
from bench.driver import Client
from bench.run import Ctx, med, pct, rnd, target
from harness import wait_for


class Stream:
    """(sent, answered, outcome, answer) of every sentiment.analyze from ``inflight`` threads, one
    task each at a time (``get()`` on several in order waits 1 s for one that had arrived)."""

    def __init__(self, worker: Any, inflight: int = 4) -> None:
        self.client, self.stop, self.inflight = Client(worker), threading.Event(), inflight
        self.events: list[tuple[float, float, str, dict[str, Any] | None]] = []
        self.threads = [threading.Thread(target=self.run, args=(k,)) for k in range(inflight)]

    def run(self, slot: int) -> None:
        for i in itertools.count(slot, self.inflight):
            if self.stop.is_set():
                return
            t_sent, text = time.time(), texts()[i % len(texts())]
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


def watch_replies(worker: Any, expected: int, out: dict[str, Any]) -> threading.Thread:
    """A thread: seconds from the reload request's publication to each reply, in ``out``."""
    from shared.reload import channel, reply_key

    pubsub = worker.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(worker.prefix))

    def run() -> None:
        try:
            deadline, request = time.monotonic() + 120, None
            while request is None and time.monotonic() < deadline:
                if (msg := pubsub.get_message(timeout=0.5)) and msg.get("type") == "message":
                    request = json.loads(msg["data"])
            if request is not None:
                key, times = reply_key(worker.prefix, request["id"]), out.setdefault("reply_s", [])
                while len(times) < expected and time.monotonic() < deadline:
                    new = worker.client.llen(key) - len(times)
                    times += [time.time() - request["sent_at"]] * new
                    time.sleep(0.01)
        finally:
            pubsub.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def reload_once(alpha: Any, version: str) -> dict[str, Any]:
    """``modelworkers reload sentiment --version V --wait --json`` while the channel is watched."""
    watched: dict[str, Any] = {}
    watcher, t0 = watch_replies(alpha, 4, watched), time.time()
    cli = ["-m", "workers.cli", "reload", "sentiment", "--version", version, "--wait", "--json"]
    run = {"cwd": ROOT, "env": alpha.env, "capture_output": True, "text": True, "timeout": 240}
    done, t1 = subprocess.run([sys.executable, *cli], **run), time.time()
    watcher.join(30)
    try:
        outcome = json.loads(done.stdout)
    except json.JSONDecodeError:
        outcome = {"ok": False, "unparsed": done.stdout[-2000:], "stderr": done.stderr[-2000:]}
    replied = watched.get("reply_s", [])
    rec = {"version": version, "cli_rc": done.returncode, "cli_started": t0, "t_end": t1}
    rec |= {"cli_wall_s": t1 - t0, "ok": outcome.get("ok"), "missing": outcome.get("missing")}
    rec["send_to_all_replies_s"] = max(replied) if len(replied) >= 4 else None
    rec["seconds"] = [x.get("seconds") for r in outcome.get("replies", []) for x in r["results"]]
    return rec


def run(ctx: Ctx) -> dict[str, Any]:
    kw = {"concurrency": 2, "prefix": f"mwbench-fleet-{uuid.uuid4().hex[:6]}"}
    nodes = [ctx.worker(REAL_MODELS, node=f"{n}@{kw['prefix']}", **kw) for n in "ab"]
    reloads = []
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(ctx.running(node, wait=False))
        for node in nodes:
            ctx.ready(node, timeout=240)
        with Stream(nodes[0], inflight=4) as stream:
            time.sleep(1.0)
            for version in ["1.1.0", "1.0.0", "1.1.0"][: ctx.n(3, 1)]:
                before = len(stream.events)
                rec = reload_once(nodes[0], version)
                served = len(stream.events)
                wait_for(lambda s=served: len(stream.events) >= s + 16, 60, "tasks after reload")
                reloads.append(rec | {"tasks_during": served - before})
                time.sleep(1.0)
        events = stream.events
    failed = [e for e in events if e[2] != "ok"]
    fallback = [e for e in events if e[3] is not None and e[3].get("fallback")]
    windows = [(r["cli_started"], r["t_end"]) for r in reloads]
    inside = [any(a <= e[1] and e[0] <= b for a, b in windows) for e in events]
    ok = [((e[1] - e[0]) * 1000, w) for e, w in zip(events, inside, strict=True) if e[2] == "ok"]
    lat_in, lat_out = [ms for ms, w in ok if w], [ms for ms, w in ok if not w]
    send_all = [r["send_to_all_replies_s"] for r in reloads if r["send_to_all_replies_s"]]
    per_process = [s for r in reloads for s in r["seconds"] if s]
    cli_wall = med([r["cli_wall_s"] for r in reloads])
    summary = {
        "reloads (all 4 processes ok)": f"{sum(bool(r['ok']) for r in reloads)}/{len(reloads)}",
        "send -> all four replies, s (median)": rnd(med(send_all), 2),
        "CLI wall time (incl. its start), s (median)": rnd(cli_wall, 2),
        "per-process reload seconds (median)": rnd(med(per_process), 2),
        "stream tasks total / during reloads": f"{len(events)} / {sum(inside)}",
        "failed tasks": len(failed),
        "fallback answers": len(fallback),
        "latency p50/p99 ms during reloads": f"{med(lat_in):.1f} / {pct(lat_in, 99):.1f}",
        "latency p50/p99 ms otherwise": f"{med(lat_out):.1f} / {pct(lat_out, 99):.1f}",
    }
    stream_ = {"tasks": len(events), "failed": [e[2] for e in failed][:20]}
    stream_["versions_seen"] = sorted({e[3]["version"] for e in events if e[3]})
    targets = [target("failed tasks during reloads under load", len(failed), 0, unit=" tasks")]
    raw = {"reloads": reloads, "stream": stream_}
    config = {"nodes": 2, "concurrency": 2, "stream_inflight": 4, "reloads": len(reloads)}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
