"""Section 2, first job: the first task of each family a (single) pool process serves after
READY, vs that family's warm p50; eager loading (the real manifest) vs lazy (same models,
``lazy = true``)."""

from __future__ import annotations

from functools import partial
from typing import Any

from bench.context import CORES, Ctx, med, rnd
from bench.data import REAL_MODELS, bench_manifest, family_jobs
from bench.driver import Client
from bench.report import target

FAMILIES = ["sentiment", "prophet", "arima", "predict", "clustering"]
WARM_N = {"sentiment": 30, "clustering": 30, "predict": 12, "arima": 12, "prophet": 8}
IDLE_GAP_S = 0.5  # the model's own cost of a call after a pause, per family


def helper_job(family: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The task's arguments as bench.helper's in-process call of ``family`` takes them."""
    if family in ("prophet", "arima"):
        return [args[0], args[1], kwargs["frequency" if family == "prophet" else "order"]]
    return args if family == "predict" else args[0]


def first_tasks(ctx: Ctx, manifest: Any, order: list[str], rep: int) -> list[dict[str, Any]]:
    """One -c 1 worker: each family's first task in ``order``, then its warm calls."""
    rows = []
    worker = ctx.worker(concurrency=1, env={"MODEL_REPOSITORY": str(manifest)})
    with ctx.running(worker):
        client = Client(worker)
        client.warm()  # the client is warm, as a web app's is: the worker is measured
        try:
            for position, family in enumerate(order):
                name, args, kwargs = family_jobs()[family]
                with ctx.block() as blk:  # a first call cannot be repeated: recorded
                    first_ms, _ = client.call(name, args, kwargs)
                warm_n = WARM_N[family] if not ctx.quick else max(4, WARM_N[family] // 3)
                warm = ctx.measure(partial(client.sequential, name, [(args, kwargs)], warm_n))
                rows.append(
                    {
                        "rep": rep,
                        "family": family,
                        "position": position,
                        "first_ms": first_ms,
                        "first_foreign_cores": round(blk.foreign_cores, 3),
                        "warm_ms": warm,
                    }
                )
        finally:
            client.close()
    return rows


def run(ctx: Ctx) -> dict[str, Any]:
    reps = ctx.n(len(FAMILIES), 1)  # full: each family is the process's very first task once
    manifests = {"eager": REAL_MODELS, "lazy": bench_manifest("lazy", lazy=True)}
    modes = ["eager", "lazy"] if not ctx.quick else ["eager"]
    raw: dict[str, Any] = {m: [] for m in modes}
    for rep in range(reps):
        for mode in modes:
            order = FAMILIES[rep:] + FAMILIES[:rep]
            raw[mode] += first_tasks(ctx, manifests[mode], order, rep)
    summary: dict[str, Any] = {}
    targets = []
    table: dict[str, dict[str, Any]] = {}
    for mode in modes:
        for family in FAMILIES:
            rows = [r for r in raw[mode] if r["family"] == family]
            first = med([r["first_ms"] for r in rows])
            warm = med([ms for r in rows for ms in r["warm_ms"]])
            very_first = [r["first_ms"] for r in rows if r["position"] == 0]
            later = med([r["first_ms"] for r in rows if r["position"] > 0])
            early_warm = med([r["warm_ms"][0] for r in rows])
            table[f"{mode}/{family}"] = {
                "first_ms": rnd(first, 2),
                "warm_p50_ms": rnd(warm, 2),
                "ratio": rnd(first / warm),
                "first_as_process_first_task_ms": rnd(very_first[0], 2) if very_first else None,
                "first_when_not_process_first_ms": rnd(later, 2),
                "second_call_ms": rnd(early_warm, 2),
            }
            summary[f"{mode} {family}: first ms / warm p50 ms / ratio"] = (
                f"{first:.1f} / {warm:.1f} / {first / warm:.2f}x"
            )
            if very_first:
                summary[
                    f"{mode} {family}: as the process's 1st task / otherwise / 2nd call, ms"
                ] = f"{very_first[0]:.1f} / {later:.1f} / {early_warm:.1f}"
            if mode == "eager":
                targets.append(
                    target(f"first {family} task after READY / warm p50 (eager)", first / warm, 1.5)
                )
    process_first = [
        r["first_ms"] / med(r["warm_ms"]) for r in raw.get("eager", []) if r["position"] == 0
    ]
    if process_first:
        summary["eager: the process's very first task / its family's warm p50 (median)"] = rnd(
            med(process_first)
        )
    if not ctx.quick:
        # The model itself, in one process with the worker child's torch threads: a call after
        # an idle pause (as the first task after READY comes) vs back to back (as the warm p50).
        threads = CORES  # what a -c 1 worker's child gets (Settings.resolved_torch_threads)
        raw["in_process_idle"] = {}
        with ctx.helper(REAL_MODELS, threads=threads) as helper:
            for family in FAMILIES:
                job = helper_job(family, *family_jobs()[family][1:])
                helper.latency(family, [job], 5)
                after_idle = ctx.measure(partial(helper.latency, family, [job], 8, IDLE_GAP_S))
                back_to_back = ctx.measure(partial(helper.latency, family, [job], 30))
                raw["in_process_idle"][family] = {"idle": after_idle, "b2b": back_to_back}
                idle_ms, b2b_ms = med(after_idle), med(back_to_back)
                summary[
                    f"in-process {family} ({threads} torch threads): after {IDLE_GAP_S} s idle / "
                    "back to back, p50 ms"
                ] = f"{idle_ms:.2f} / {b2b_ms:.2f} = {idle_ms / b2b_ms:.2f}x"
                for t in targets:  # beside the target: what the model itself does after a pause
                    if t["name"].startswith(f"first {family} task"):
                        t["detail"] = f"in-process after a pause {idle_ms / b2b_ms:.2f}x"
    if "lazy" in modes:
        for family in FAMILIES:
            saved = table[f"lazy/{family}"]["first_ms"] - table[f"eager/{family}"]["first_ms"]
            summary[f"preloading saves on the first {family} task, ms"] = rnd(saved, 1)
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "table": table,
        "config": {
            "concurrency": 1,
            "repeats": reps,
            "warm_n": WARM_N,
            "order": "rotated: each family is the process's first task once",
        },
    }
