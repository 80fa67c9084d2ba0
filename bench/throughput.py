"""Section 4, throughput: sentiment texts/s through the workers with the MiniLM classifier,
vs the raw in-process batched pipeline (tokenizer + forward, batch 32, 2 torch threads)
measured in the same rounds; lone-request p50 in the threads pool vs prefork."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import CORES, Client, Ctx, Driver, med, rnd
from bench.data import CACHE, ROOT, bench_manifest, ensure_minilm, texts
from bench.report import plot_throughput, target

CONFIGS: dict[str, dict[str, Any]] = {
    "prefork_c1": {"pool": "prefork", "concurrency": 1, "env": {}},
    "prefork_c2": {"pool": "prefork", "concurrency": 2, "env": {}},
    "threads_w0": {"pool": "threads", "concurrency": 64, "env": {"BATCH_WINDOW_MS": "0"}},
    "threads_w2": {"pool": "threads", "concurrency": 64, "env": {"BATCH_WINDOW_MS": "2"}},
    # not an issue target: the same with 1 torch thread, a core left for message intake
    "threads_w2_t1": {
        "pool": "threads",
        "concurrency": 64,
        "env": {"BATCH_WINDOW_MS": "2", "TORCH_THREADS": "1"},
    },
    "batch32_c1": {"pool": "prefork", "concurrency": 1, "env": {}, "batch": True},
    "batch32_c2": {"pool": "prefork", "concurrency": 2, "env": {}, "batch": True},
}
RAW_THREADS = 2


def batch_stats(worker: Any) -> dict[str, int]:
    """The threads pool's micro-batcher counters (its snapshot, after one heartbeat)."""
    time.sleep(1.2)
    for snap in worker.snapshots():
        stats = (snap.get("stats") or {}).get("sentiment_batching")
        if stats:
            return dict(stats)
    return {}


def raw_rates(helper: Any, texts_: list[str]) -> list[float]:
    """texts/s of one round of the raw pipeline (batch 32) in the helper process."""
    return list(helper.cmd(cmd="raw_throughput", texts=texts_, batch=32, rounds=1)["rates"])


def lone_latency(ctx: Ctx, manifest: Path) -> dict[str, Any]:
    """One request at a time: a prefork -c 1 worker and a threads -c 64 worker (window 2 ms)
    run side by side (own queues), measured in alternating blocks."""
    corpus = [([t], {}) for t in texts()[:64]]
    workers = {
        "prefork_c1": ctx.worker(concurrency=1, env={"MODEL_MANIFEST": str(manifest)}),
        "threads_w2": ctx.worker(
            concurrency=64, pool="threads", env={"MODEL_MANIFEST": str(manifest)}
        ),
    }
    out: dict[str, Any] = {"ms": {k: [] for k in workers}, "round_rises_ms": []}
    with ctx.running(workers["prefork_c1"]), ctx.running(workers["threads_w2"]):
        clients = {k: Client(w) for k, w in workers.items()}
        try:
            for client in clients.values():
                client.sequential("sentiment.analyze", corpus, 5)
            for _ in range(ctx.n(8, 2)):
                block: dict[str, float] = {}
                for name, client in clients.items():
                    ms = ctx.measure(partial(client.sequential, "sentiment.analyze", corpus, 10))
                    out["ms"][name] += ms
                    block[name] = med(ms)
                out["round_rises_ms"].append(block["threads_w2"] - block["prefork_c1"])
        finally:
            for client in clients.values():
                client.close()
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    minilm = ensure_minilm()
    manifest = bench_manifest("eager-minilm", sentiment="minilm")
    corpus = texts()
    reps = ctx.n(3, 1)
    n_single = ctx.n(384, 64)  # tasks per single-text measurement (~4 s at 64 in flight here)
    n_raw = ctx.n(256, 64)  # texts per raw round (8 batches of 32)
    curve_points = [1, 4, 16] if not ctx.quick else []
    names = list(CONFIGS) if not ctx.quick else ["threads_w2"]
    raw: dict[str, Any] = {"raw_rates": {}, "configs": {}}
    single_jobs = [[t] for t in corpus]
    batch_jobs = [[corpus[i : i + 32]] for i in range(0, len(corpus), 32)]
    raw_side = bench_manifest("minilm-only", sentiment="minilm", only=["sentiment", "textblob"])
    with ctx.helper(raw_side, threads=RAW_THREADS, raw_model=minilm) as helper:
        helper.cmd(cmd="raw_throughput", texts=corpus[:64], batch=32, rounds=1)  # warm
        for name in names:
            cfg = CONFIGS[name]
            worker = ctx.worker(
                concurrency=cfg["concurrency"],
                pool=cfg["pool"],
                env={"MODEL_MANIFEST": str(manifest), **cfg["env"]},
            )
            rec: dict[str, Any] = {"runs": [], "curve": {}, "raw_rates": [], "lone_ms": []}
            with ctx.running(worker):
                driver = Driver(worker)
                try:
                    if cfg.get("batch"):
                        task, jobs, inflight, per_task = (
                            "sentiment.analyze_batch",
                            batch_jobs,
                            2,
                            32,
                        )
                        total = max(4, n_single // 32)
                    else:
                        task, jobs, inflight, per_task = "sentiment.analyze", single_jobs, 64, 1
                        total = n_single
                    driver.run(task, jobs, min(total, 64), inflight)  # warm
                    before = batch_stats(worker)
                    for _ in range(reps):
                        rates = ctx.measure(partial(raw_rates, helper, corpus[:n_raw]))
                        rec["raw_rates"] += rates
                        res = ctx.measure(
                            partial(
                                driver.run,
                                task,
                                jobs,
                                total,
                                inflight * cfg["concurrency"] if cfg.get("batch") else inflight,
                            )
                        )
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
                        for k in curve_points:
                            res = ctx.measure(
                                partial(
                                    driver.run, task, jobs, max(4 * k, min(n_single, 32 * k)), k
                                )
                            )
                            rec["curve"][str(k)] = res["tasks"] / res["seconds"]
                finally:
                    driver.close()
                rec["batching_stats"] = [s.get("stats") for s in worker.snapshots()]
            raw["configs"][name] = rec
    raw["lone"] = lone_latency(ctx, manifest) if not ctx.quick else {"ms": {}, "round_rises_ms": []}
    summary: dict[str, Any] = {}
    targets = []
    table: dict[str, Any] = {}
    all_raw = [r for rec in raw["configs"].values() for r in rec["raw_rates"]]
    raw["raw_median"] = med(all_raw)
    summary["raw in-process pipeline texts/s (batch 32, 2 threads), median"] = rnd(med(all_raw), 1)
    for name, rec in raw["configs"].items():
        tps = med([r["texts_per_s"] for r in rec["runs"]])
        raw_here = med(rec["raw_rates"])
        paired = med([r["ratio_to_raw"] for r in rec["runs"]])
        failures = sum(len(r["failures"]) for r in rec["runs"])
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
    lone = {name: med(ms) for name, ms in raw["lone"]["ms"].items()}
    for name, p50 in lone.items():
        summary[f"lone request p50 ms, {name}"] = rnd(p50, 2)
    rises = raw["lone"]["round_rises_ms"]
    t = table
    if "threads_w2" in t:
        targets.append(
            target(
                "threads pool, 64 single-text in flight / raw (window 2 ms)",
                t["threads_w2"]["ratio"],
                1.0,
                op=">=",
            )
        )
    if "threads_w0" in t:
        targets.append(
            target(
                "threads pool, 64 single-text in flight / raw (window 0 ms)",
                t["threads_w0"]["ratio"],
                1.0,
                op=">=",
            )
        )
    batch = [t[k]["ratio"] for k in ("batch32_c1", "batch32_c2") if k in t]
    if batch:
        targets.append(
            target(
                "analyze_batch, 32 texts per task / raw (best of -c 1, -c 2)",
                max(batch),
                1.0,
                op=">=",
            )
        )
    if rises:
        summary["lone request p50 rise, threads pool - prefork (median of rounds), ms"] = rnd(
            med(rises), 2
        )
        targets.append(
            target(
                "lone request p50 rise, threads pool (window 2 ms) vs prefork",
                med(rises),
                5.0,
                unit="ms",
            )
        )
    raw["curves"] = {n: rec["curve"] for n, rec in raw["configs"].items() if rec["curve"]}
    raw["batch_points"] = {n: t[n]["texts_per_s"] for n in ("batch32_c1", "batch32_c2") if n in t}
    plot = (
        (ROOT / "docs" / "img" / "throughput.png")
        if not ctx.quick
        else (CACHE / "throughput-quick.png")
    )
    if raw["curves"]:
        plot_throughput(
            raw,
            Path(plot),
            f"sentiment (MiniLM-L6 classifier) through the workers, "
            f"{CORES} cores; raw median {raw['raw_median']:.0f} texts/s",
        )
        summary["plot"] = str(Path(plot).relative_to(ROOT))
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "table": table,
        "config": {
            "model": "MiniLM-L6 + 2-label head (bench/.cache/minilm-cls)",
            "tasks_per_measure": n_single,
            "repeats": reps,
            "raw_threads": RAW_THREADS,
            "raw_texts_per_round": n_raw,
            "client": "one-thread driver: Celery publishes, Redis pub/sub results",
        },
    }
