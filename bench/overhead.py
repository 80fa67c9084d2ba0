"""Section 3, overhead: sequential requests (one in flight) through Celery vs the same registry
model called in-process on the same inputs, same torch threads, in short alternating rounds."""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import CORES, Ctx, med, pct, rnd, task_runtimes_ms
from bench.data import CUSTOMERS, REAL_MODELS, arima_series, bench_manifest, prophet_series, texts
from bench.driver import Client, alternate
from bench.helper import Helper
from bench.report import target

# family -> (task, calls per round full, quick)
FAMILIES = {
    "sentiment": ("sentiment.analyze", 20, 20),
    "clustering": ("clustering.assign", 20, 20),
    "arima": ("forecast.arima", 4, 2),
    "prophet": ("forecast.prophet", 3, 2),
}
ROUNDS = (15, 3)  # full, quick: short alternating blocks, so both sides see the same machine
CeleryJobs = list[tuple[list[Any], dict[str, Any]]]


def jobs(family: str) -> tuple[list[Any], CeleryJobs]:
    """(in-process inputs, Celery (args, kwargs)) for the same work."""
    if family == "sentiment":
        corpus = texts()[:64]
        return corpus, [([t], {}) for t in corpus]
    if family == "clustering":
        return [CUSTOMERS], [([CUSTOMERS], {})]
    if family == "arima":
        s = arima_series()
        return [[s, 5, [1, 1, 1]]], [([s, 5], {"order": [1, 1, 1]})]
    s = prophet_series()
    return [[s, 7, "D"]], [([s, 7], {"frequency": "D"})]


def timed(client: Client, task: str, jobs: CeleryJobs, n: int) -> tuple[list[float], list[str]]:
    """``n`` sequential calls: their latencies and task ids."""
    client.ids.clear()
    return client.sequential(task, jobs, n), list(client.ids)


def one_round(
    ctx: Ctx,
    helper: Helper,
    client: Client,
    worker: Any,
    family: str,
    n: int,
    out: dict[str, Any],
    model: str = "sentiment",
) -> None:
    """``n`` in-process calls (``model``: the helper's name of the worker's sentiment model),
    then ``n`` Celery calls (one in flight), each side a block; appended to ``out``."""
    inputs, celery_jobs = jobs(family)
    local: list[float] = ctx.measure(partial(helper.latency, family, inputs, n, model=model))
    remote, ids = ctx.measure(partial(timed, client, FAMILIES[family][0], celery_jobs, n))
    for key, values in (("inproc_ms", local), ("celery_ms", remote)):
        out.setdefault(key, []).extend(values)
    out.setdefault("round_ratios", []).append(med(remote) / med(local))
    out.setdefault("runtime_ms", []).extend(task_runtimes_ms(worker, ids))


def measure(ctx: Ctx, manifest: Path, families: list[str], threads: int) -> dict[str, Any]:
    env = {"MODEL_REPOSITORY": str(manifest), "TORCH_THREADS": str(threads)}
    worker = ctx.worker(concurrency=1, env=env)
    out: dict[str, Any] = {f: {} for f in families}
    with ctx.running(worker, wait=False), ctx.helper(manifest, threads=threads) as helper:
        ctx.ready(worker)  # the helper loaded meanwhile
        assert helper.cmd("threads")["torch_threads"] == threads
        client = Client(worker)
        try:
            for family in families:  # warm both sides, not recorded
                helper.latency(family, jobs(family)[0], 3)
                client.sequential(FAMILIES[family][0], jobs(family)[1], 3)
            for _ in range(ctx.n(*ROUNDS)):
                for f in families:
                    one_round(ctx, helper, client, worker, f, ctx.n(*FAMILIES[f][1:]), out[f])
            time.sleep(1.2)  # one heartbeat: the snapshot's serving counters are fresh
            snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
            for family, model in (("sentiment", "sentiment"), ("clustering", "customer_segments")):
                if family in out and snaps:
                    # mean of every model call inside the worker (tasks.base.served)
                    out[family]["worker_model_mean_ms"] = snaps[0]["models"][model][
                        "latency_mean_ms"
                    ]
        finally:
            client.close()
    return out


ABLATION: dict[str, tuple[dict[str, str], list[str]]] = {
    "product config": ({}, []),
    "+ task events (Flower watching)": ({"BENCH_TASK_EVENTS": "1"}, []),
    "+ result_extended": ({"BENCH_RESULT_EXTENDED": "1"}, []),
    "+ task_track_started": ({"BENCH_TRACK_STARTED": "1"}, []),
    "--loglevel WARNING": ({}, ["--loglevel", "WARNING"]),
    "solo pool (no parent/child hop)": ({}, ["--pool", "solo"]),
}
FLOOR = "bench.noop on the product config (Celery + Redis floor)"


def ablation(ctx: Ctx, threads: int) -> dict[str, Any]:
    """tiny-bert sentiment.analyze p50 with some of celeryconfig.py's settings off (through
    bench/exp_app.py): one -c 1 worker per variant, side by side, alternating blocks."""
    calls: dict[str, tuple[Client, str]] = {}
    with ExitStack() as stack:
        for name, (env, args) in ABLATION.items():
            env = {"MODEL_REPOSITORY": str(REAL_MODELS), "TORCH_THREADS": str(threads), **env}
            worker = ctx.worker(concurrency=1, env=env, app="bench.exp_app")
            if args:
                at = worker.args.index(args[0])
                worker.args[at : at + 2] = args
            stack.enter_context(ctx.running(worker, wait=False))
            calls[name] = (Client(worker), "sentiment.analyze")
            stack.callback(calls[name][0].close)
        for client, _ in calls.values():
            client.worker.wait_ready(1, timeout=240)  # solo and -c 1 prefork: one process each
        calls[FLOOR] = (calls["product config"][0], "bench.noop")
        corpus = [([t], {}) for t in texts()[:64]]
        rounds = alternate(ctx, calls, corpus, ctx.n(10, 2), 20)
    return {name: [ms for r in rounds[name] for ms in r] for name in calls}


def run(ctx: Ctx) -> dict[str, Any]:
    threads = CORES  # a concurrency-1 worker's default, set explicitly on both sides
    raw: dict[str, Any] = {}
    families = list(FAMILIES) if not ctx.quick else ["sentiment", "clustering"]
    raw["tiny-bert"] = measure(ctx, REAL_MODELS, families, threads)
    if not ctx.quick:
        # the same at 1 torch thread on both sides: robust to other tenants of a shared machine
        raw["tiny-bert, 1 thread"] = measure(ctx, REAL_MODELS, ["sentiment"], 1)
        minilm = bench_manifest("eager-minilm", sentiment="minilm")
        raw["minilm"] = measure(ctx, minilm, ["sentiment"], threads)
    summary: dict[str, Any] = {}
    targets = []
    table: dict[str, Any] = {}
    noop = float("nan")  # a task with no model: the least any task costs end to end here
    if not ctx.quick:
        raw["ablation"] = ablation(ctx, threads)
        base = med(raw["ablation"]["product config"])
        noop = med(raw["ablation"][FLOOR])
        for name, ms in raw["ablation"].items():
            what = name if name == FLOOR else f"tiny-bert sentiment, {name}"
            summary[f"ablation p50 ms: {what}"] = f"{med(ms):.2f} ({med(ms) - base:+.2f})"
    for model, fams in raw.items():
        if model == "ablation":
            continue
        for family, d in fams.items():
            ip50, ip99 = med(d["inproc_ms"]), pct(d["inproc_ms"], 99)
            c50, c99 = med(d["celery_ms"]), pct(d["celery_ms"], 99)
            rt50 = med(d["runtime_ms"])
            paired = med(d["round_ratios"])
            label = family + (f" ({model})" if family == "sentiment" else "")
            table[label] = {
                "inproc_p50_ms": rnd(ip50, 2),
                "inproc_p99_ms": rnd(ip99, 2),
                "celery_p50_ms": rnd(c50, 2),
                "celery_p99_ms": rnd(c99, 2),
                "p50_ratio": rnd(c50 / ip50),
                "median_round_ratio": rnd(paired),
                "p50_diff_ms": rnd(c50 - ip50, 2),
                "worker_task_runtime_p50_ms": rnd(rt50, 2),
                "n": len(d["celery_ms"]),
            }
            summary[f"{label}: p50 in-process / Celery ms, ratio, +ms"] = (
                f"{ip50:.2f} / {c50:.2f}, {c50 / ip50:.2f}x, +{c50 - ip50:.2f}"
            )
            summary[f"{label}: median of per-round p50 ratios"] = rnd(paired)
            summary[f"{label}: p99 in-process / Celery ms"] = f"{ip99:.2f} / {c99:.2f}"
            summary[f"{label}: task runtime in the worker p50 ms"] = rnd(rt50, 2)
            if d.get("worker_model_mean_ms") is not None:
                summary[f"{label}: model call mean ms, in-process / inside the worker"] = (
                    f"{statistics.fmean(d['inproc_ms']):.2f} / {d['worker_model_mean_ms']:.2f}"
                )
                table[label]["worker_model_mean_ms"] = rnd(d["worker_model_mean_ms"], 2)
            if family != "sentiment":
                continue
            # the floor: the model's own p50 plus a no-model task's round trip (same run)
            floor = (ip50 + noop) / ip50
            ratio_floor = ms_floor = ""
            if noop == noop:  # measured (not in --quick)
                table[label]["floor_ratio"] = rnd(floor)
                summary[f"{label}: floor, (in-process + bench.noop p50) / in-process"] = (
                    f"{floor:.2f}x (+{noop:.2f} ms)"
                )
                ratio_floor, ms_floor = f"floor {floor:.2f}x", f"floor +{noop:.2f} ms"
            targets.append(
                target(
                    f"sentiment.analyze p50 / in-process p50 ({model})",
                    paired,
                    1.2,
                    detail=ratio_floor,
                )
            )
            if model.startswith("tiny-bert"):
                targets.append(
                    target(
                        f"sentiment.analyze p50 - in-process p50 ({model})",
                        c50 - ip50,
                        3.0,
                        unit="ms",
                        detail=ms_floor,
                    )
                )
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "table": table,
        "config": {
            "torch_threads": threads,
            "worker": "prefork -c 1",
            "rounds": ctx.n(*ROUNDS),
            "client": "Celery send_task(...).get()",
            "ratio": "median over rounds of (Celery p50 / in-process p50) in that round",
        },
    }
