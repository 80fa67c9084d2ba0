"""Section 1, cold start: worker launch -> every pool process READY, three loading strategies;
launch -> first answer vs a bare Python process that imports, loads and answers once."""

from __future__ import annotations

import re
import time
from typing import Any

from bench.context import Ctx, cpu_seconds, med, rnd
from bench.data import REAL_MODELS, texts
from bench.driver import release
from bench.report import target

# (a), (b), (c): three loading strategies, all in PRELOAD_MODE=child (each pool process loads its
# own weights); (d) is the default (PRELOAD_MODE=auto -> parent on a CPU-only host: imports and
# weights in the parent, children fork and warm up).
CONFIGS = {
    "a_child_sequential": {"PRELOAD_MODE": "child", "PREIMPORT": "false", "LOADER_THREADS": "1"},
    "b_child_threadpool": {"PRELOAD_MODE": "child", "PREIMPORT": "false", "LOADER_THREADS": "4"},
    "c_child_preimport": {"PRELOAD_MODE": "child", "PREIMPORT": "true", "LOADER_THREADS": "4"},
    "d_default_auto": {},
}


def launch_to_ready(ctx: Ctx, env: dict[str, str], concurrency: int = 2) -> dict[str, Any]:
    worker = ctx.worker(concurrency=concurrency, env={"MODEL_REPOSITORY": str(REAL_MODELS), **env})
    with ctx.launched(worker, concurrency) as out:
        out["cpu_s"] = sum(cpu_seconds(worker.pid).values())  # the worker and its pool processes
        # what the worker logged about its start: preimport seconds, per-process load seconds
        pre = re.findall(r"imported model libraries in ([0-9.]+) s", worker.log())
        loads = re.findall(r"pid \d+ loaded \d+ models in ([0-9.]+) s", worker.log())
        out["preimport_s"] = float(pre[0]) if pre else None
        out["child_load_s"] = [float(x) for x in loads]
        return out


def launch_to_first_answer(ctx: Ctx, concurrency: int) -> dict[str, Any]:
    """The task is queued before the worker is launched; seconds from launch to its result."""
    from harness import close_app

    worker = ctx.worker(concurrency=concurrency, env={"MODEL_REPOSITORY": str(REAL_MODELS)})
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
    """python -m bench.helper: import the stack, ModelRegistry.load_all, one sentiment answer;
    timed from spawn to the answer line on its stdout."""
    with ctx.helper(REAL_MODELS, threads=0, text=texts()[0]) as bare:
        answer = bare.first
        return {
            "seconds": bare.t_answer - bare.t_spawn,
            "label": answer["label"],
            "import_and_load_s": answer["loaded"] - bare.t_spawn,
            "torch_threads": answer["torch_threads"],
        }


def run(ctx: Ctx) -> dict[str, Any]:
    reps = ctx.n(3, 1)
    names = list(CONFIGS) if not ctx.quick else ["a_child_sequential", "c_child_preimport"]
    raw: dict[str, list[Any]] = {k: [] for k in [*names, "first_answer_c2", "first_answer_c1"]}
    raw["bare"] = []
    order = [*names, "bare", "first_answer_c2"] + ([] if ctx.quick else ["first_answer_c1"])
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
    first_c2, bare = median("first_answer_c2"), median("bare")
    first_c1 = median("first_answer_c1") if raw["first_answer_c1"] else None
    summary: dict[str, Any] = {}
    for k in names:
        summary[f"{k}: launch -> all READY seen in Redis, s (median)"] = rnd(ready[k], 2)
        summary[f"{k}: CPU seconds of the worker tree at READY"] = rnd(cpu[k], 1)
        summary[f"{k}: launch -> last model loaded, s (median)"] = rnd(
            median(k, "last_loaded_s"), 2
        )
    summary["worker -c 2 launch -> first answer, s"] = rnd(first_c2, 2)
    if first_c1 is not None:
        summary["worker -c 1 launch -> first answer, s"] = rnd(first_c1, 2)
    summary["bare python: spawn -> first answer, s"] = rnd(bare, 2)
    a = ready["a_child_sequential"]
    ratio_ca = ready["c_child_preimport"] / a
    summary["(c)/(a) READY ratio"] = rnd(ratio_ca)
    # No start can beat one process that imports, loads and answers once: bare / (a) is the
    # lowest (c)/(a) any loading strategy could reach on this machine.
    summary["lowest possible (c)/(a): bare python first answer / (a) READY"] = rnd(bare / a)
    summary["(c)/(a) CPU seconds ratio"] = rnd(cpu["c_child_preimport"] / cpu["a_child_sequential"])
    for key in ("b_child_threadpool", "d_default_auto"):
        if key in ready:
            summary[f"({key[0]})/(a) READY ratio"] = rnd(ready[key] / a)
    summary["worker -c 2 first answer / bare"] = rnd(first_c2 / bare)
    if first_c1 is not None:
        summary["worker -c 1 first answer / bare"] = rnd(first_c1 / bare)
    targets = [
        target(
            "(c) imports in parent, weights in child / (a) sequential child",
            ratio_ca,
            0.5,
            detail=f"floor {bare / a:.2f}x",
        ),
        target("worker launch -> first answer / bare process (-c 2)", first_c2 / bare, 1.2),
    ]
    if first_c1 is not None:
        targets.append(
            target("worker launch -> first answer / bare process (-c 1)", first_c1 / bare, 1.2)
        )
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "config": {"concurrency": 2, "manifest": "models/models.toml", "repeats": reps},
    }
