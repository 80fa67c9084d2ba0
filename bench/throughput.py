"""Throughput: MiniLM texts/s per pool and backend vs the raw in-process pipeline; lone p50s."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from bench import mlserver
from bench.data import CACHE, MINILM_DIR, ROOT, ensure_minilm, minilm_onnx, repository, texts
from bench.driver import Client, Driver, alternate
from bench.helper import Helper
from bench.run import CORES, Ctx, med, rnd, target

W2 = {"MODELWORKERS_BATCH_WINDOW_MS": "2"}
# pool, -c, env, analyze_batch tasks in flight (0: single-text sentiment.analyze, 64 in flight)
CONFIGS: dict[str, tuple[str, int, dict[str, str], int]] = {
    "prefork_c1": ("prefork", 1, {}, 0),
    "prefork_c2": ("prefork", 2, {}, 0),
    "threads_w0": ("threads", 64, {"MODELWORKERS_BATCH_WINDOW_MS": "0"}, 0),
    "threads_w2": ("threads", 64, W2, 0),
    "batch32_c1": ("prefork", 1, {}, 2),
    "batch32_c2": ("prefork", 2, {}, 4),
    "prefork_c2_onnx": ("prefork", 2, {}, 0),  # the defaults: prefork, pool batching, ONNX
    "threads_w2_onnx": ("threads", 64, W2, 0),
    "batch32_lone_onnx": ("prefork", 2, {}, 1),  # the default worker, one batch at a time
}
DEFAULT = "prefork_c2_onnx"  # the worker as it starts with no settings, on the CPU
LONE = {  # name: pool, -c, env, ONNX; side by side, one request at a time
    "prefork_c1": ("prefork", 1, {}, False),
    "threads_w2": ("threads", 64, W2, False),
    "default": ("prefork", 2, {}, True),
    "default_no_pool_batching": ("prefork", 2, {"MODELWORKERS_POOL_BATCHING": "false"}, True),
}
# lone p50 of the first minus the second: limit, ms
RISES = {("threads_w2", "prefork_c1"): 5.0, ("default", "default_no_pool_batching"): 2.0}
RATIOS = {  # configuration: its target, texts/s >= the raw pipeline's of the same rounds
    "threads_w2": "threads pool, 64 single-text in flight / raw (window 2 ms)",
    "threads_w0": "threads pool, 64 single-text in flight / raw (window 0 ms)",
    DEFAULT: "default worker (prefork -c 2, ONNX), 64 single-text in flight / raw torch",
    "batch32_lone_onnx": "a lone analyze_batch of 32 texts, default worker / raw torch",
}
CURVES = {  # the throughput plot's lines, then its points
    "prefork_c1": "prefork -c 1, single-text tasks",
    "prefork_c2": "prefork -c 2, single-text tasks",
    "threads_w0": "threads -c 64, micro-batching, window 0 ms",
    "threads_w2": "threads -c 64, micro-batching, window 2 ms",
    "prefork_c2_onnx": "prefork -c 2, ONNX Runtime (the defaults), single-text tasks",
    "threads_w2_onnx": "threads -c 64, window 2 ms, ONNX Runtime",
}
POINTS = {
    "batch32_c1": ("analyze_batch, 32 texts/task, prefork -c 1 (2 tasks in flight)", "s"),
    "batch32_c2": ("analyze_batch, 32 texts/task, prefork -c 2 (4 tasks in flight)", "D"),
    "mlserver_adaptive": ("MLServer 1.7.1, adaptive batching (torch), 64 in flight", "*"),
}


def batch_stats(worker: Any) -> dict[str, int]:
    """The threads pool's micro-batcher counters (its snapshot, after one heartbeat)."""
    time.sleep(1.2)
    stats = [(snap.get("stats") or {}).get("sentiment_batching") for snap in worker.snapshots()]
    return next((dict(s) for s in stats if s), {})


def lone_latency(ctx: Ctx, models: Path, onnx_models: Path) -> dict[str, Any]:
    """One request at a time: the LONE workers side by side, alternating blocks."""
    with ExitStack() as stack:
        calls = {}
        for k, (pool, concurrency, env, onnx) in LONE.items():
            w = ctx.worker(onnx_models if onnx else models, env, concurrency=concurrency, pool=pool)
            stack.enter_context(ctx.running(w))
            calls[k] = (stack.enter_context(Client(w)), "sentiment.analyze")
        rounds = alternate(ctx, calls, [([t], {}) for t in texts()[:64]], ctx.n(8, 2), 10)
    rises = {
        f"{a} - {b}": [med(x) - med(y) for x, y in zip(rounds[a], rounds[b], strict=True)]
        for a, b in RISES
    }
    ms = {k: [x for r in rs for x in r] for k, rs in rounds.items()}
    return {"ms": ms, "round_rises_ms": rises}


def paired_runs(
    ctx: Ctx, helper: Helper, send: Callable[[], dict[str, Any]], texts_per_run: int
) -> dict[str, Any]:
    """``send()`` (a run at 64 in flight) ctx.n(3, 1) times, each after a raw round: texts/s and
    its ratio to that round's raw pipeline."""
    rec: dict[str, Any] = {"runs": [], "curve": {}, "raw_rates": []}
    for _ in range(ctx.n(3, 1)):
        rates = ctx.measure(partial(helper.raw_rates, texts()[: ctx.n(256, 64)]))
        rec["raw_rates"] += rates
        res = ctx.measure(send)
        res["texts_per_s"] = texts_per_run / res["seconds"]
        res["ratio_to_raw"] = res["texts_per_s"] / med(rates)
        rec["runs"].append(res)
    return rec


def mlserver_config(ctx: Ctx, helper: Helper) -> dict[str, Any]:
    """MLServer's adaptive batching on the same texts, measured as ``measure_config`` does."""
    n = ctx.n(384, 64)
    with mlserver.serving(ctx) as (send, settings):
        rec = paired_runs(ctx, helper, partial(send, n), n)
    rec["curve"]["64"] = med([r["texts_per_s"] for r in rec["runs"]])
    return rec | {"mlserver": settings}


def measure_config(ctx: Ctx, helper: Helper, name: str, models: Path) -> dict[str, Any]:
    """Texts/s of a configuration at 64 in flight, each run beside a raw round; then 1 and 8."""
    pool, concurrency, env, batch = CONFIGS[name]
    corpus, n_single = texts(), ctx.n(384, 64)
    worker = ctx.worker(models, env, concurrency=concurrency, pool=pool)
    task, per_task, inflight, total = "sentiment.analyze", 1, 64, n_single
    jobs: list[Any] = [[t] for t in corpus]
    if batch:
        task, per_task, inflight = "sentiment.analyze_batch", 32, batch
        total = max(4, n_single // 32)
        jobs = [[corpus[i : i + 32]] for i in range(0, len(corpus), 32)]
    with ctx.running(worker), Driver(worker, ctx.logs) as driver:
        driver.run(task, jobs, min(total, 64), inflight)  # warm
        before = batch_stats(worker)
        rec = paired_runs(
            ctx, helper, partial(driver.run, task, jobs, total, inflight), total * per_task
        )
        after = batch_stats(worker)
        if after.get("batches", 0) > before.get("batches", 0):
            rec["micro_batches"] = {k: after[k] - before[k] for k in ("batches", "items")}
            rec["micro_batches"]["largest"] = after.get("largest")
        if not batch:
            rec["curve"]["64"] = med([r["texts_per_s"] for r in rec["runs"]])
            for k in [1, 8] if not ctx.quick else []:
                n = max(4 * k, min(n_single, 32 * k))
                res = ctx.measure(partial(driver.run, task, jobs, n, k))
                rec["curve"][str(k)] = res["tasks"] / res["seconds"]
                rec.setdefault("curve_p50_ms", {})[str(k)] = res["p50_ms"]
    return rec


def plot_throughput(data: dict[str, Any], path: Path, cores: int) -> Path:
    """Texts/s vs requests in flight per worker configuration, with the raw pipeline line."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for key, label in CURVES.items():
        if curve := data.get("curves", {}).get(key):
            xs = sorted(int(k) for k in curve)
            ax.plot(xs, [curve[str(x)] for x in xs], marker="o", label=label)
    for key, (label, marker) in POINTS.items():
        if value := data.get("batch_points", {}).get(key):
            ax.scatter([64], [value], marker=marker, s=60, label=label, zorder=5)
    if raw := data.get("raw_median"):
        label = "raw in-process pipeline (batch 32, 2 threads)"
        ax.axhline(raw, color="black", linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="single-text requests in flight", ylabel="texts / s", ylim=(0, None))
    title = f"sentiment (MiniLM-L6 classifier) through the workers, {cores} cores; "
    ax.set_title(title + f"raw median {raw or 0:.0f} texts/s", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(ctx: Ctx) -> dict[str, Any]:
    minilm = ensure_minilm()
    models = repository("minilm", sentiment=MINILM_DIR)  # torch: the folder has no model.onnx
    onnx_models = repository("minilm-onnx", sentiment=minilm_onnx())
    raw: dict[str, Any] = {"configs": {}}
    raw_side = repository("minilm-only", sentiment=MINILM_DIR, only=("sentiment", "textblob"))
    with Helper(raw_side, threads=2, logs=ctx.logs, raw_model=minilm) as helper:
        helper.raw_rates(texts()[:64])  # warm
        fresh = partial(helper.raw_rates, texts()[: ctx.n(256, 64)], rounds=3)
        raw["quiet_raw_rates"] = ctx.measure(fresh)  # no worker alive yet: the quiet baseline
        for name in list(CONFIGS) if not ctx.quick else [DEFAULT]:
            repo = onnx_models if name.endswith("_onnx") else models
            raw["configs"][name] = measure_config(ctx, helper, name, repo)
        if not ctx.quick:  # the same work on MLServer, for comparison; a failure is recorded
            try:
                raw["configs"]["mlserver_adaptive"] = mlserver_config(ctx, helper)
            except Exception as exc:
                raw["mlserver_adaptive"] = f"not measured: {type(exc).__name__}: {exc}"[:500]
    raw["lone"] = lone_latency(ctx, models, onnx_models) if not ctx.quick else {"ms": {}}
    raw["raw_median"] = med([r for rec in raw["configs"].values() for r in rec["raw_rates"]])
    quiet = med(raw["quiet_raw_rates"])
    summary: dict[str, Any] = {
        "raw, fresh process before any worker (quiet), texts/s": rnd(quiet, 1),
        "raw in-process pipeline texts/s (batch 32, 2 threads), median": rnd(raw["raw_median"], 1),
    }
    ratios, tps = {}, {}
    for name, rec in raw["configs"].items():
        tps[name], raw_here = med([r["texts_per_s"] for r in rec["runs"]]), med(rec["raw_rates"])
        ratios[name] = med([r["ratio_to_raw"] for r in rec["runs"]])
        summary[f"{name}: texts/s; x raw of the same rounds (median of paired ratios); x quiet"] = (
            f"{tps[name]:.1f}; {ratios[name]:.2f}x (raw {raw_here:.1f}); {tps[name] / quiet:.2f}x"
        )
        if len(curve := rec["curve"]) > 1:
            summary[f"{name}: texts/s at 1 / 8 / 64 in flight (x quiet raw)"] = " / ".join(
                f"{curve[k]:.1f} ({curve[k] / quiet:.2f}x)" for k in ("1", "8", "64")
            )
        if mb := rec.get("micro_batches"):
            key = f"{name}: mean micro-batch at 64 in flight (largest)"
            summary[key] = f"{mb['items'] / mb['batches']:.1f} ({mb['largest']})"
        if failures := sum(r["failed"] for r in rec["runs"]):
            summary[f"{name}: failed tasks"] = failures
    if why := raw.get("mlserver_adaptive"):
        summary["mlserver_adaptive"] = why
    for name, ms in raw["lone"]["ms"].items():
        summary[f"lone request p50 ms, {name}"] = rnd(med(ms), 2)
    targets = [target(what, ratios[k], 1, op=">=") for k, what in RATIOS.items() if k in ratios]
    for (a, b), limit in RISES.items():
        if rises := raw["lone"].get("round_rises_ms", {}).get(f"{a} - {b}"):
            what = f"lone request p50 rise, {a} vs {b}"
            summary[what + ", ms (median of rounds)"] = rnd(med(rises), 2)
            targets.append(target(what, med(rises), limit, unit="ms"))
    raw["curves"] = {n: rec["curve"] for n, rec in raw["configs"].items() if rec["curve"]}
    points = [n for n in tps if n == "mlserver_adaptive" or CONFIGS[n][3] > 1]  # at 64 in flight
    raw["batch_points"] = {n: tps[n] for n in points}
    plot = CACHE / "throughput-quick.png" if ctx.quick else ROOT / "docs" / "img" / "throughput.png"
    if raw["curves"]:
        summary["plot"] = str(plot_throughput(raw, plot, CORES).relative_to(ROOT))
    config = {"model": "MiniLM-L6 + 2-label head (bench/.cache/minilm-cls)", "raw_threads": 2}
    config |= {"tasks_per_measure": ctx.n(384, 64), "raw_texts_per_round": ctx.n(256, 64)}
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
