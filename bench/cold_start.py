"""Cold start: worker launch -> every pool process READY, three loading strategies; launch ->
first answer vs a bare Python process that imports, loads and answers once."""

from __future__ import annotations

import re
import time
from typing import Any

from bench.data import REAL_MODELS, texts
from bench.driver import release
from bench.report import target
from bench.run import Ctx, cpu_seconds, med, ready_time, rnd

# (a), (b), (c): three loading strategies, all in PRELOAD_MODE=child (each pool process loads its
# own weights); (d) is the default (PRELOAD_MODE=auto -> parent on a CPU-only host).
CONFIGS = {
    "a_child_sequential": {"PRELOAD_MODE": "child", "PREIMPORT": "false", "LOADER_THREADS": "1"},
    "b_child_threadpool": {"PRELOAD_MODE": "child", "PREIMPORT": "false", "LOADER_THREADS": "4"},
    "c_child_preimport": {"PRELOAD_MODE": "child", "PREIMPORT": "true", "LOADER_THREADS": "4"},
    "d_default_auto": {},
}
ENV = {"MODEL_REPOSITORY": str(REAL_MODELS)}


def launch_to_ready(ctx: Ctx, env: dict[str, str], concurrency: int = 2) -> dict[str, Any]:
    worker = ctx.worker(concurrency=concurrency, env={**ENV, **env})
    t_launch = time.time()
    with ctx.running(worker, wait=False):
        out = ready_time(worker, concurrency, t_launch)
        out["cpu_s"] = sum(cpu_seconds(worker.pid).values())  # the worker and its pool processes
        pre = re.findall(r"imported model libraries in ([0-9.]+) s", worker.log())
        loads = re.findall(r"pid \d+ loaded \d+ models in ([0-9.]+) s", worker.log())
        out["preimport_s"] = float(pre[0]) if pre else None
        out["child_load_s"] = [float(x) for x in loads]
        return out


def launch_to_first_answer(ctx: Ctx, concurrency: int) -> dict[str, Any]:
    """The task is queued before the worker is launched; seconds from launch to its result."""
    from harness import close_app

    worker = ctx.worker(concurrency=concurrency, env=ENV)
    app = worker.app()
    try:
        result = app.send_task("sentiment.analyze", args=[texts()[0]])
        t0 = time.time()
        worker.start()
        try:
            value = result.get(timeout=240)
            seconds = time.time() - t0
        finally:
            release(app, result)
            worker.stop()
        return {"seconds": seconds, "label": value["label"], "fallback": value["fallback"]}
    finally:
        close_app(app)


def bare_first_answer(ctx: Ctx) -> dict[str, Any]:
    """bench.helper: import the stack, ModelRegistry.load_all, one sentiment answer; timed from
    spawn to the answer line on its stdout."""
    with ctx.helper(REAL_MODELS, threads=0, text=texts()[0]) as bare:
        return {
            "seconds": bare.t_answer - bare.t_spawn,
            "label": bare.first["label"],
            "import_and_load_s": bare.first["loaded"] - bare.t_spawn,
            "torch_threads": bare.first["torch_threads"],
        }


def run(ctx: Ctx) -> dict[str, Any]:
    reps = ctx.n(3, 1)
    names = list(CONFIGS) if not ctx.quick else ["a_child_sequential", "c_child_preimport"]
    firsts = ["first_answer_c2"] + ([] if ctx.quick else ["first_answer_c1"])
    raw: dict[str, list[Any]] = {k: [] for k in [*names, "bare", *firsts]}
    order = list(raw)
    for rep in range(reps):
        for key in order[rep % len(order) :] + order[: rep % len(order)]:  # spread machine drift
            ctx.quiet()
            if key in CONFIGS:
                raw[key].append(launch_to_ready(ctx, CONFIGS[key]))
            elif key == "bare":
                raw[key].append(bare_first_answer(ctx))
            else:
                raw[key].append(launch_to_first_answer(ctx, int(key[-1])))

    def median(key: str, field: str = "seconds") -> float:
        return med([r[field] for r in raw[key]])

    ready = {k: median(k, "observed_s") for k in names}
    cpu = {k: median(k, "cpu_s") for k in names}
    bare, a = median("bare"), ready["a_child_sequential"]
    summary: dict[str, Any] = {}
    for k in names:
        summary[f"{k}: launch -> all READY seen in Redis, s (median)"] = rnd(ready[k], 2)
        summary[f"{k}: CPU seconds of the worker tree at READY"] = rnd(cpu[k], 1)
        summary[f"{k}: launch -> last model loaded, s"] = rnd(median(k, "last_loaded_s"), 2)
        summary[f"({k[0]})/(a) READY ratio"] = rnd(ready[k] / a)
    summary["bare python: spawn -> first answer, s"] = rnd(bare, 2)
    # no start can beat one process that imports, loads and answers once: the floor of (c)/(a)
    summary["lowest possible (c)/(a): bare python first answer / (a) READY"] = rnd(bare / a)
    summary["(c)/(a) CPU seconds ratio"] = rnd(cpu["c_child_preimport"] / cpu["a_child_sequential"])
    ratio_ca = ready["c_child_preimport"] / a
    what = "(c) imports in parent, weights in child / (a) sequential child"
    targets = [target(what, ratio_ca, 0.5, detail=f"floor {bare / a:.2f}x")]
    for key in firsts:
        first, c = median(key), key[-1]
        summary[f"worker -c {c} launch -> first answer, s; / bare"] = (
            f"{first:.2f}; {first / bare:.2f}x"
        )
        targets.append(
            target(f"worker launch -> first answer / bare process (-c {c})", first / bare, 1.2)
        )
    config = {"concurrency": 2, "models": "models/ (the shipped repository)", "repeats": reps}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
