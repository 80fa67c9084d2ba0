"""First job: the first call of every task a (single) pool process serves after READY, vs that
task's warm p50; eager loading (the shipped repository) vs lazy (the same models, ``lazy``)."""

from __future__ import annotations

from functools import partial
from typing import Any

from bench.data import REAL_MODELS, inproc_job, repository, task_jobs
from bench.driver import Client
from bench.report import target
from bench.run import CORES, Ctx, med, rnd

WARM_N = {"sentiment": 30, "clustering": 30, "models_predict": 30, "predict": 12, "arima": 12}
WARM_N |= {"prophet": 8, "fit": 12}
IDLE_GAP_S = 0.5  # the model's own cost of a call after a pause, per family


def first_tasks(ctx: Ctx, models: Any, order: list[str], rep: int) -> list[dict[str, Any]]:
    """One -c 1 worker: each family's first task in ``order``, then its warm calls."""
    rows = []
    with ctx.running(ctx.worker(concurrency=1, env={"MODEL_REPOSITORY": str(models)})) as worker:
        client = Client(worker)
        client.warm()  # the client is warm, as a web app's is: the worker is measured
        try:
            for position, family in enumerate(order):
                name, args, kwargs = task_jobs()[family]
                with ctx.block() as blk:  # a first call cannot be repeated: recorded
                    first_ms, _ = client.call(name, args, kwargs)
                warm_n = WARM_N[family] if not ctx.quick else max(4, WARM_N[family] // 3)
                warm = ctx.measure(partial(client.sequential, name, [(args, kwargs)], warm_n))
                rows.append(
                    {"rep": rep, "family": family, "position": position}
                    | {
                        "first_ms": first_ms,
                        "first_foreign_cores": round(blk.foreign_cores, 3),
                        "warm_ms": warm,
                    }
                )
        finally:
            client.close()
    return rows


def run(ctx: Ctx) -> dict[str, Any]:
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
    for mode in modes:
        for family in families:
            rows = [r for r in raw[mode] if r["family"] == family]
            first = firsts[mode, family] = med([r["first_ms"] for r in rows])
            warm = med([ms for r in rows for ms in r["warm_ms"]])
            very_first = [f"{r['first_ms']:.1f}" for r in rows if r["position"] == 0]
            task = task_jobs()[family][0]
            summary[
                f"{mode} {task}: first ms / warm p50 ms / ratio (as the process's 1st task)"
            ] = f"{first:.1f} / {warm:.1f} / {first / warm:.2f}x ({', '.join(very_first) or '-'})"
            if mode == "eager":
                targets.append(target(f"first {task} after READY / warm p50", first / warm, 1.5))
    if not ctx.quick:
        # the model itself, in one process with the worker child's torch threads: a call after
        # an idle pause (as the first task after READY comes) vs back to back (as the warm p50)
        raw["in_process_idle"] = {}
        with ctx.helper(REAL_MODELS, threads=CORES) as helper:
            for family, t in zip(families, targets, strict=True):
                job = inproc_job(family, *task_jobs()[family][1:])
                helper.latency(family, [job], 5)
                after_idle = ctx.measure(partial(helper.latency, family, [job], 8, IDLE_GAP_S))
                back_to_back = ctx.measure(partial(helper.latency, family, [job], 30))
                raw["in_process_idle"][family] = {"idle": after_idle, "b2b": back_to_back}
                ratio = med(after_idle) / med(back_to_back)
                summary[f"in-process {family}: after {IDLE_GAP_S} s idle / back to back"] = (
                    f"{med(after_idle):.2f} / {med(back_to_back):.2f} ms = {ratio:.2f}x"
                )
                t["detail"] = f"in-process after a pause {ratio:.2f}x"
        for family in families:
            saved = firsts["lazy", family] - firsts["eager", family]
            summary[f"preloading saves on the first {family} task, ms"] = rnd(saved, 1)
    config = {"concurrency": 1, "repeats": reps, "warm_n": WARM_N, "order": "rotated"}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
