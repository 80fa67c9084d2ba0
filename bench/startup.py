"""Starting: cold start by loading strategy vs a bare process; each task's first job after READY."""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Any

from bench.data import REAL_MODELS, jobs, repository, task_jobs, texts
from bench.driver import Client, release
from bench.helper import Helper
from bench.run import CORES, Ctx, cpu_seconds, med, ready_time, rnd, target

# (a)-(c): each pool process loads its own weights (PRELOAD_MODE=child); (d): the default
LOADING = ("MODELWORKERS_PRELOAD_MODE", "MODELWORKERS_PREIMPORT", "MODELWORKERS_LOADER_THREADS")
CONFIGS = {
    "a_child_sequential": dict(zip(LOADING, ("child", "false", "1"), strict=True)),
    "b_child_threadpool": dict(zip(LOADING, ("child", "false", "4"), strict=True)),
    "c_child_preimport": dict(zip(LOADING, ("child", "true", "4"), strict=True)),
    "d_default_auto": {},
}


def launch_to_ready(ctx: Ctx, env: dict[str, str], concurrency: int = 2) -> dict[str, Any]:
    worker, t_launch = ctx.worker(REAL_MODELS, env, concurrency=concurrency), time.time()
    with ctx.running(worker, wait=False):
        out = ready_time(worker, concurrency, t_launch)
        out["cpu_s"] = sum(cpu_seconds(worker.pid).values())  # the worker and its pool processes
        return out


def launch_to_first_answer(ctx: Ctx, concurrency: int) -> dict[str, Any]:
    """The task is queued before the worker is launched; seconds from launch to its result."""
    worker = ctx.worker(REAL_MODELS, concurrency=concurrency)
    with Client(worker) as client:
        result, t0 = client.app.send_task("sentiment.analyze", args=[texts()[0]]), time.time()
        try:
            with ctx.running(worker, wait=False):
                value, seconds = result.get(timeout=240), time.time() - t0
            return {"seconds": seconds, "label": value["label"], "fallback": value["fallback"]}
        finally:
            release(client.app, result)


def bare_first_answer(ctx: Ctx) -> dict[str, Any]:
    """bench.helper (imports, load_all, one answer), timed from spawn to its answer line."""
    with Helper(REAL_MODELS, threads=0, logs=ctx.logs, text=texts()[0]) as bare:
        out = {"seconds": bare.t_answer - bare.t_spawn, "label": bare.first["label"]}
        out["import_and_load_s"] = bare.first["loaded"] - bare.t_spawn
        return out | {"torch_threads": bare.first["torch_threads"]}


def cold_start(ctx: Ctx) -> dict[str, Any]:
    reps = ctx.n(3, 1)
    names = list(CONFIGS) if not ctx.quick else ["a_child_sequential", "c_child_preimport"]
    firsts = ["first_answer_c2"] + ([] if ctx.quick else ["first_answer_c1"])
    runs = {k: partial(launch_to_ready, ctx, CONFIGS[k]) for k in names}
    runs["bare"] = partial(bare_first_answer, ctx)
    runs |= {k: partial(launch_to_first_answer, ctx, int(k[-1])) for k in firsts}
    raw: dict[str, list[Any]] = {k: [] for k in runs}
    order = list(raw)
    for rep in range(reps):
        for key in order[rep % len(order) :] + order[: rep % len(order)]:  # spread machine drift
            ctx.quiet()
            raw[key].append(runs[key]())

    def median(key: str, field: str = "seconds") -> float:
        return med([r[field] for r in raw[key]])

    ready, cpu = {k: median(k, "observed_s") for k in names}, {k: median(k, "cpu_s") for k in names}
    bare, a, summary = median("bare"), ready["a_child_sequential"], {}
    for k in names:
        key = f"{k}: launch -> all READY seen in Redis, s; x (a); CPU s; last model loaded, s"
        last = median(k, "last_loaded_s")
        summary[key] = f"{ready[k]:.2f}; {ready[k] / a:.2f}x; {cpu[k]:.1f}; {last:.2f}"
    summary["bare python: spawn -> first answer, s"] = rnd(bare, 2)
    # no start can beat one process that imports, loads and answers once: the floor of (c)/(a)
    summary["lowest possible (c)/(a): bare python first answer / (a) READY"] = rnd(bare / a)
    summary["(c)/(a) CPU seconds ratio"] = rnd(cpu["c_child_preimport"] / cpu["a_child_sequential"])
    what = "(c) imports in parent, weights in child / (a) sequential child"
    targets = [target(what, ready["c_child_preimport"] / a, 0.5, detail=f"floor {bare / a:.2f}x")]
    for key in firsts:
        first, c = median(key), key[-1]
        key = f"worker -c {c} launch -> first answer, s; / bare"
        summary[key] = f"{first:.2f}; {first / bare:.2f}x"
        what = f"worker launch -> first answer / bare process (-c {c})"
        targets.append(target(what, first / bare, 1.2))
    config = {"concurrency": 2, "models": "models/ (the shipped repository)", "repeats": reps}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}


WARM_N = {"sentiment": 30, "clustering": 30, "models_predict": 30, "prophet": 8}  # else 12
IDLE_GAP_S = 0.5  # the model's own cost of a call after a pause, per family


def first_tasks(ctx: Ctx, models: Any, order: list[str], rep: int) -> list[dict[str, Any]]:
    """One -c 1 worker: each family's first task in ``order``, then its warm calls."""
    rows = []
    with ctx.running(ctx.worker(models, concurrency=1)) as worker, Client(worker) as client:
        client.warm()  # the client is warm, as a web app's is: the worker is measured
        for position, family in enumerate(order):
            name, args, kwargs = task_jobs()[family]
            with ctx.block() as blk:  # a first call cannot be repeated: recorded
                first_ms, _ = client.call(name, args, kwargs)
            n = WARM_N.get(family, 12)
            n = ctx.n(n, max(4, n // 3))
            warm = ctx.measure(partial(client.sequential, name, [(args, kwargs)], n))
            row = {"rep": rep, "family": family, "position": position, "first_ms": first_ms}
            for _ in range(2) if not ctx.quick and not models.name.startswith("lazy") else ():
                time.sleep(IDLE_GAP_S)  # a warm worker, paused: what any call after a pause costs
                row.setdefault("paused_ms", []).append(client.call(name, args, kwargs)[0])
            rows.append(row | {"first_foreign_cores": blk["foreign_cores"], "warm_ms": warm})
    return rows


def first_job(ctx: Ctx) -> dict[str, Any]:
    families = list(task_jobs())
    reps = ctx.n(len(families), 1)  # full: each task is the process's very first task once
    models = {"eager": REAL_MODELS, "lazy": repository("lazy", lazy=True)}
    modes = ["eager", "lazy"] if not ctx.quick else ["eager"]
    raw: dict[str, Any] = {m: [] for m in modes}
    for rep in range(reps):
        for mode in modes:
            raw[mode] += first_tasks(ctx, models[mode], families[rep:] + families[:rep], rep)
    summary: dict[str, Any] = {}
    targets, firsts = [], {}
    for mode, family in itertools.product(modes, families):
        rows = [r for r in raw[mode] if r["family"] == family]
        first = firsts[mode, family] = med([r["first_ms"] for r in rows])
        warm = med([ms for r in rows for ms in r["warm_ms"]])
        very_first = ", ".join(f"{r['first_ms']:.1f}" for r in rows if r["position"] == 0)
        task = task_jobs()[family][0]
        key = f"{mode} {task}: first ms / warm p50 ms / ratio (as the process's 1st task)"
        summary[key] = f"{first:.1f} / {warm:.1f} / {first / warm:.2f}x ({very_first or '-'})"
        if mode == "eager":
            targets.append(target(f"first {task} after READY / warm p50", first / warm, 1.5))
        if paused := [ms for r in rows for ms in r.get("paused_ms", [])]:
            key = f"{mode} {task}: a warm worker's call after {IDLE_GAP_S} s idle / warm p50"
            summary[key] = f"{med(paused):.1f} / {warm:.1f} ms = {med(paused) / warm:.2f}x"
            targets[-1]["detail"] = f"after a pause, warm: {med(paused) / warm:.2f}x"
    if not ctx.quick:
        # the model alone, a worker child's threads: after an idle pause (as a first task comes)
        raw["in_process_idle"] = {}
        with Helper(REAL_MODELS, threads=CORES, logs=ctx.logs) as helper:
            for family, t in zip(families, targets, strict=True):
                job = jobs(family)[0][0]  # the task's one job (sentiment: its text)
                helper.latency(family, [job], 5)
                idle = ctx.measure(partial(helper.latency, family, [job], 8, gap=IDLE_GAP_S))
                b2b = ctx.measure(partial(helper.latency, family, [job], 30))  # back to back
                raw["in_process_idle"][family] = {"idle": idle, "b2b": b2b}
                ratio = med(idle) / med(b2b)
                key = f"in-process {family}: after {IDLE_GAP_S} s idle / back to back"
                summary[key] = f"{med(idle):.2f} / {med(b2b):.2f} ms = {ratio:.2f}x"
                t["detail"] = f"{t.get('detail', '')}; in-process: {ratio:.2f}x".lstrip("; ")
        for family in families:
            saved = firsts["lazy", family] - firsts["eager", family]
            summary[f"preloading saves on the first {family} task, ms"] = rnd(saved, 1)
    config = {"concurrency": 1, "repeats": reps, "order": "rotated"}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
