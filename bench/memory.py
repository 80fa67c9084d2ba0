"""Section 5, memory: total PSS of a worker (main process + pool processes) with 1, 2, 4 pool
processes, copy-on-write (PRELOAD_MODE=parent) vs child mode, MiniLM as sentiment, after each
process served requests; vs one plain Python process serving the same models."""

from __future__ import annotations

import time
from typing import Any

from bench.common import Client, Ctx, Driver, med, private_breakdown, rnd, tree_memory
from bench.data import CUSTOMERS, bench_manifest, texts
from bench.report import target


def touch_jobs() -> dict[str, Any]:
    return {"sentiment": texts()[1], "clustering": CUSTOMERS, "predict": ["co2_prophet", 6]}


def touch_worker(worker: Any, processes: int, calls: int = 3, rounds: int = 12) -> dict[int, int]:
    """Send bursts until every pool process has served ``calls`` sentiment tasks (its snapshot
    counts them), plus a few clustering / forecast.predict tasks."""
    corpus = texts()
    driver = Driver(worker)
    client = Client(worker)
    counts: dict[int, int] = {}
    try:
        for _ in range(rounds):
            driver.run(
                "sentiment.analyze", [[t] for t in corpus[:64]], 4 * processes, 2 * processes
            )
            driver.run("clustering.assign", [[CUSTOMERS]], 2 * processes, 2 * processes)
            driver.run("forecast.predict", [["co2_prophet", 6]], 2 * processes, 2 * processes)
            time.sleep(1.2)  # one heartbeat: fresh snapshots
            counts = {
                s["pid"]: s["models"]["sentiment"]["calls"]
                for s in worker.snapshots()
                if s.get("node") == worker.node
            }
            if len(counts) >= processes and min(counts.values()) >= calls:
                break
        client.call("sentiment.analyze", [corpus[2]])
    finally:
        driver.close()
        client.close()
    return counts


def run(ctx: Ctx) -> dict[str, Any]:
    manifest = bench_manifest("eager-minilm", sentiment="minilm")
    sizes = [1, 2, 4] if not ctx.quick else [2]
    modes = ["parent", "child"] if not ctx.quick else ["parent"]
    raw: dict[str, Any] = {"baseline": [], "workers": {}}

    def baseline() -> None:
        with ctx.helper(manifest, threads=2) as helper:
            helper.cmd(cmd="touch", jobs=touch_jobs(), times=4)
            time.sleep(0.5)
            mem = tree_memory(helper.pid)
            mem["private_by_mapping"] = private_breakdown(helper.pid)
            raw["baseline"].append(mem)

    baseline()
    for mode in modes:
        for n in sizes:
            worker = ctx.worker(
                concurrency=n, env={"MODEL_MANIFEST": str(manifest), "PRELOAD_MODE": mode}
            )
            with ctx.running(worker, ready_timeout=300):
                time.sleep(1.0)
                at_ready = tree_memory(worker.pid)
                counts = touch_worker(worker, n)
                time.sleep(0.5)
                mem = tree_memory(worker.pid)
                mem["sentiment_calls_per_process"] = counts
                mem["at_ready"] = {
                    k: at_ready[k]
                    for k in ("total_pss_mib", "total_private_mib", "unique_resident_mib")
                }
                mem["private_by_mapping"] = {
                    f"{p['role']}:{p['pid']}": private_breakdown(p["pid"])
                    for p in mem["processes"][:2]
                }
                raw["workers"][f"{mode}_c{n}"] = mem
    if not ctx.quick:
        # one Celery process serving the same models (solo pool): the product's own
        # one-process figure, Celery's consumer included, beside the plain-process baseline
        worker = ctx.worker(concurrency=1, pool="solo", env={"MODEL_MANIFEST": str(manifest)})
        with ctx.running(worker, ready_timeout=300):
            time.sleep(1.0)
            counts = touch_worker(worker, 1)
            time.sleep(0.5)
            mem = tree_memory(worker.pid)
            mem["sentiment_calls_per_process"] = counts
            mem["at_ready"] = {"total_pss_mib": None}
            raw["workers"]["solo_c1"] = mem
    baseline()
    base_pss = med([b["total_pss_mib"] for b in raw["baseline"]])
    base_unique = med([b["unique_resident_mib"] or 0 for b in raw["baseline"]]) or None
    summary: dict[str, Any] = {
        "baseline: one python process, PSS MiB": rnd(base_pss, 1),
        "baseline: distinct resident MiB": base_unique,
    }
    targets = []
    table: dict[str, Any] = {}
    for key, mem in raw["workers"].items():
        children = [p for p in mem["processes"] if p["role"] == "child"]
        main = next(p for p in mem["processes"] if p["role"] == "main")
        ratio = mem["total_pss_mib"] / base_pss
        uratio = (
            mem["unique_resident_mib"] / base_unique
            if mem["unique_resident_mib"] and base_unique
            else None
        )
        table[key] = {
            "total_pss_mib": mem["total_pss_mib"],
            "pss_ratio": rnd(ratio),
            "unique_resident_mib": mem["unique_resident_mib"],
            "unique_ratio": rnd(uratio) if uratio else None,
            "main_pss_mib": main["pss_mib"],
            "main_private_mib": main["private_mib"],
            "child_private_mib": [c["private_mib"] for c in children],
            "child_pss_mib": [c["pss_mib"] for c in children],
        }
        summary[f"{key}: total PSS MiB (x baseline); distinct resident x"] = (
            f"{mem['total_pss_mib']:.0f} ({ratio:.2f}x); " + (f"{uratio:.2f}x" if uratio else "-")
        )
        if mem["at_ready"]["total_pss_mib"] is not None:
            summary[f"{key}: total PSS MiB at READY, before any request"] = mem["at_ready"][
                "total_pss_mib"
            ]
        summary[f"{key}: private MiB main / per child"] = (
            f"{main['private_mib']:.0f} / " + ", ".join(f"{c['private_mib']:.0f}" for c in children)
        )
    if "solo_c1" in table:
        solo = table["solo_c1"]["total_pss_mib"]
        for n in (2, 4):
            if f"parent_c{n}" in table:
                summary[f"parent_c{n} / one Celery process (solo pool) serving the same models"] = (
                    rnd(table[f"parent_c{n}"]["total_pss_mib"] / solo)
                )
    for n, limit in ((2, 1.2), (4, 1.4)):
        if f"parent_c{n}" in table:
            targets.append(
                target(
                    f"total PSS, {n} pool processes, copy-on-write / one plain process",
                    table[f"parent_c{n}"]["pss_ratio"],
                    limit,
                )
            )
    return {
        "raw": raw,
        "summary": summary,
        "targets": targets,
        "table": table,
        "config": {
            "model": "MiniLM as sentiment + the real forecasting/clustering models",
            "measure": "sum of Pss in /proc/PID/smaps_rollup over main + children; "
            "distinct resident = unique page frames (pagemap)",
        },
    }
