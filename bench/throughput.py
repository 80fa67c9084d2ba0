"""Section 4, throughput: sentiment texts/s through the workers with the MiniLM classifier,
vs the raw in-process batched pipeline (tokenizer + forward, batch 32, 2 torch threads)
measured in the same rounds; lone-request p50 in the threads pool vs prefork."""

from __future__ import annotations

import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import CORES, Ctx, med, rnd
from bench.data import CACHE, ROOT, bench_manifest, ensure_minilm, texts
from bench.driver import Client, Driver, alternate
from bench.helper import Helper
from bench.report import plot_throughput, target

CONFIGS: dict[str, dict[str, Any]] = {
    "prefork_c1": {"pool": "prefork", "concurrency": 1, "env": {}},
    "prefork_c2": {"pool": "prefork", "concurrency": 2, "env": {}},
    "threads_w0": {"pool": "threads", "concurrency": 64, "env": {"BATCH_WINDOW_MS": "0"}},
    "threads_w2": {"pool": "threads", "concurrency": 64, "env": {"BATCH_WINDOW_MS": "2"}},
    # no target: the same with 1 torch thread, a core left for message intake
    "threads_w2_t1": {
        "pool": "threads",
        "concurrency": 64,
        "env": {"BATCH_WINDOW_MS": "2", "TORCH_THREADS": "1"},
    },
    "batch32_c1": {"pool": "prefork", "concurrency": 1, "env": {}, "batch": True},
    "batch32_c2": {"pool": "prefork", "concurrency": 2, "env": {}, "batch": True},
}
RAW_THREADS = 2
TARGETS = {  # config -> the target on its ratio to the raw pipeline
    "threads_w2": "threads pool, 64 single-text in flight / raw (window 2 ms)",
    "threads_w0": "threads pool, 64 single-text in flight / raw (window 0 ms)",
}


def batch_stats(worker: Any) -> dict[str, int]:
    """The threads pool's micro-batcher counters (its snapshot, after one heartbeat)."""
    time.sleep(1.2)
    for snap in worker.snapshots():
        if stats := (snap.get("stats") or {}).get("sentiment_batching"):
            return dict(stats)
    return {}


def raw_rates(helper: Helper, texts_: list[str]) -> list[float]:
    """texts/s of one round of the raw pipeline (batch 32) in the helper process."""
    return list(helper.cmd("raw_throughput", texts=texts_, batch=32, rounds=1)["rates"])


def lone_latency(ctx: Ctx, manifest: Path) -> dict[str, Any]:
    """One request at a time: a prefork -c 1 worker and a threads -c 64 worker (window 2 ms)
    run side by side (own queues), measured in alternating blocks."""
    env = {"MODEL_REPOSITORY": str(manifest)}
    workers = {
        "prefork_c1": ctx.worker(concurrency=1, env=env),
        "threads_w2": ctx.worker(concurrency=64, pool="threads", env=env),
    }
    with ctx.running(workers["prefork_c1"]), ctx.running(workers["threads_w2"]), ExitStack() as s:
        calls = {k: (Client(w), "sentiment.analyze") for k, w in workers.items()}
        for client, _ in calls.values():
            s.callback(client.close)
        corpus = [([t], {}) for t in texts()[:64]]
        rounds = alternate(ctx, calls, corpus, ctx.n(8, 2), 10)
    rises = [
        med(t) - med(p) for p, t in zip(rounds["prefork_c1"], rounds["threads_w2"], strict=True)
    ]
    ms = {k: [x for r in rs for x in r] for k, rs in rounds.items()}
    return {"ms": ms, "round_rises_ms": rises}


def measure_config(ctx: Ctx, helper: Helper, cfg: dict[str, Any], manifest: Path) -> dict[str, Any]:
    """Texts/s of one worker configuration at 64 in flight (``analyze_batch``: 32 texts per
    task, 2 in flight per process), each run beside a raw round; then the curve of in-flight
    counts."""
    corpus, n_single, n_raw = texts(), ctx.n(384, 64), ctx.n(256, 64)
    env = {"MODEL_REPOSITORY": str(manifest), **cfg["env"]}
    worker = ctx.worker(concurrency=cfg["concurrency"], pool=cfg["pool"], env=env)
    rec: dict[str, Any] = {"runs": [], "curve": {}, "raw_rates": []}
    if cfg.get("batch"):
        task, per_task, inflight = "sentiment.analyze_batch", 32, 2
        jobs = [[corpus[i : i + 32]] for i in range(0, len(corpus), 32)]
        total = max(4, n_single // 32)
    else:
        task, jobs, per_task, inflight, total = (
            "sentiment.analyze",
            [[t] for t in corpus],
            1,
            64,
            n_single,
        )
    with ctx.running(worker):
        driver = Driver(worker, ctx.logs)
        try:
            driver.run(task, jobs, min(total, 64), inflight)  # warm
            before = batch_stats(worker)
            for _ in range(ctx.n(3, 1)):
                rates = ctx.measure(partial(raw_rates, helper, corpus[:n_raw]))
                rec["raw_rates"] += rates
                per_run = inflight * cfg["concurrency"] if cfg.get("batch") else inflight
                res = ctx.measure(partial(driver.run, task, jobs, total, per_run))
                res["texts_per_s"] = total * per_task / res["seconds"]
                res["ratio_to_raw"] = res["texts_per_s"] / med(rates)
                rec["runs"].append(res)
            after = batch_stats(worker)
            if after.get("batches", 0) > before.get("batches", 0):
                rec["micro_batches"] = {
                    "batches": after["batches"] - before["batches"],
                    "items": after["items"] - before["items"],
                    "largest": after.get("largest"),
                }
            if not cfg.get("batch"):
                rec["curve"]["64"] = med([r["texts_per_s"] for r in rec["runs"]])
                for k in [1, 4, 16] if not ctx.quick else []:
                    n = max(4 * k, min(n_single, 32 * k))
                    res = ctx.measure(partial(driver.run, task, jobs, n, k))
                    rec["curve"][str(k)] = res["tasks"] / res["seconds"]
        finally:
            driver.close()
        rec["batching_stats"] = [s.get("stats") for s in worker.snapshots()]
    return rec


def run(ctx: Ctx) -> dict[str, Any]:
    minilm = ensure_minilm()
    manifest = bench_manifest("eager-minilm", sentiment="minilm")
    raw: dict[str, Any] = {"configs": {}}
    raw_side = bench_manifest("minilm-only", sentiment="minilm", only=["sentiment", "textblob"])
    with ctx.helper(raw_side, threads=RAW_THREADS, raw_model=minilm) as helper:
        helper.cmd("raw_throughput", texts=texts()[:64], batch=32, rounds=1)  # warm
        for name in list(CONFIGS) if not ctx.quick else ["threads_w2"]:
            raw["configs"][name] = measure_config(ctx, helper, CONFIGS[name], manifest)
    raw["lone"] = lone_latency(ctx, manifest) if not ctx.quick else {"ms": {}, "round_rises_ms": []}
    summary: dict[str, Any] = {}
    table: dict[str, Any] = {}
    raw["raw_median"] = med([r for rec in raw["configs"].values() for r in rec["raw_rates"]])
    summary["raw in-process pipeline texts/s (batch 32, 2 threads), median"] = rnd(
        raw["raw_median"], 1
    )
    for name, rec in raw["configs"].items():
        tps = med([r["texts_per_s"] for r in rec["runs"]])
        raw_here = med(rec["raw_rates"])
        paired = med([r["ratio_to_raw"] for r in rec["runs"]])
        failures = sum(r["failed"] for r in rec["runs"])
        mb = rec.get("micro_batches")
        table[name] = {
            "texts_per_s": rnd(tps, 1),
            "raw_texts_per_s": rnd(raw_here, 1),
            "ratio": rnd(paired),
            "ratio_of_medians": rnd(tps / raw_here),
            "ratio_to_overall_raw_median": rnd(tps / raw["raw_median"]),
            "failures": failures,
            "p50_ms": rnd(med([r["p50_ms"] for r in rec["runs"]]), 1),
            "mean_micro_batch": rnd(mb["items"] / mb["batches"], 2) if mb else None,
        }
        summary[f"{name}: texts/s; x raw of the same rounds (median of paired ratios)"] = (
            f"{tps:.1f}; {paired:.2f}x (raw {raw_here:.1f})"
        )
        if mb:
            summary[f"{name}: mean micro-batch at 64 in flight (largest)"] = (
                f"{mb['items'] / mb['batches']:.1f} ({mb['largest']})"
            )
        if failures:
            summary[f"{name}: failed tasks"] = failures
    for name, ms in raw["lone"]["ms"].items():
        summary[f"lone request p50 ms, {name}"] = rnd(med(ms), 2)
    targets = [target(t, table[k]["ratio"], 1.0, op=">=") for k, t in TARGETS.items() if k in table]
    if batch := [table[k]["ratio"] for k in ("batch32_c1", "batch32_c2") if k in table]:
        what = "analyze_batch, 32 texts per task / raw (best of -c 1, -c 2)"
        targets.append(target(what, max(batch), 1.0, op=">="))
    if rises := raw["lone"]["round_rises_ms"]:
        summary["lone request p50 rise, threads pool - prefork (median of rounds), ms"] = rnd(
            med(rises), 2
        )
        what = "lone request p50 rise, threads pool (window 2 ms) vs prefork"
        targets.append(target(what, med(rises), 5.0, unit="ms"))
    raw["curves"] = {n: rec["curve"] for n, rec in raw["configs"].items() if rec["curve"]}
    raw["batch_points"] = {
        n: table[n]["texts_per_s"] for n in ("batch32_c1", "batch32_c2") if n in table
    }
    plot = (
        ROOT / "docs" / "img" / "throughput.png"
        if not ctx.quick
        else CACHE / "throughput-quick.png"
    )
    if raw["curves"]:
        plot_throughput(raw, plot, CORES)
        summary["plot"] = str(plot.relative_to(ROOT))
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "table": table,
        "config": {
            "model": "MiniLM-L6 + 2-label head (bench/.cache/minilm-cls)",
            "tasks_per_measure": ctx.n(384, 64),
            "repeats": ctx.n(3, 1),
            "raw_threads": RAW_THREADS,
            "raw_texts_per_round": ctx.n(256, 64),
            "client": "driver process: Celery publishes, Redis pub/sub results",
        },
    }
