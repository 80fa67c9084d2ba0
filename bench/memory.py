"""Memory: total PSS of a worker (main process + pool processes) with 1, 2, 4 pool processes,
copy-on-write (PRELOAD_MODE=parent) vs child mode, MiniLM as sentiment, after each process served
requests; vs one plain Python process serving the same models."""

from __future__ import annotations

import os
import time
from contextlib import suppress
from typing import Any

from bench.data import CUSTOMERS, MINILM_DIR, repository, texts
from bench.driver import Client, Driver
from bench.report import target
from bench.run import Ctx, med, rnd


def smaps_rollup(pid: int) -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in KiB (Pss, Private_Clean, Private_Dirty, Rss...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def tree_memory(root_pid: int) -> dict[str, Any]:
    """PSS of a process and its descendants, private memory per process, in MiB."""
    import psutil

    root, rows = psutil.Process(root_pid), []
    for p in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            s = smaps_rollup(p.pid)
            rows.append(
                {"pid": p.pid, "role": "main" if p.pid == root_pid else "child"}
                | {
                    "pss_mib": round(s.get("Pss", 0) / 1024, 1),
                    "private_mib": round(
                        (s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)) / 1024, 1
                    ),
                    "rss_mib": round(s.get("Rss", 0) / 1024, 1),
                }
            )
    return {
        "total_pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
        "total_private_mib": round(sum(r["private_mib"] for r in rows), 1),
        "unique_resident_mib": unique_resident_mib([r["pid"] for r in rows]),
        "processes": rows,
    }


def unique_resident_mib(pids: list[int]) -> float | None:
    """Distinct physical pages resident in any of ``pids`` (each shared page counted once,
    whoever else maps it): a check on PSS that does not depend on other processes of the
    machine that map the same libraries. None where page frame numbers are not readable."""
    import numpy as np

    page, chunks = os.sysconf("SC_PAGE_SIZE"), [np.zeros(0, dtype=np.uint64)]
    try:
        for pid in pids:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", 0) as pm:
                for line in maps:
                    if "[vsyscall]" in line:
                        continue
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    pm.seek(lo // page * 8)
                    entries = np.frombuffer(pm.read((hi - lo) // page * 8), dtype=np.uint64)
                    present = (entries >> np.uint64(63)) & np.uint64(1)
                    pfn = entries & np.uint64((1 << 55) - 1)
                    chunks.append(pfn[(present == 1) & (pfn != 0)])
    except (OSError, ValueError):
        return None
    allp = np.concatenate(chunks)
    if allp.size and not allp.any():
        return None
    return round(np.unique(allp).size * page / 2**20, 1)


def touch_worker(
    ctx: Ctx, worker: Any, processes: int, calls: int = 3, batches: bool = False
) -> dict[int, int]:
    """Send bursts (single texts, ``batches`` of 32, clustering, forecast.predict) until every
    pool process has served ``calls`` sentiment tasks (its snapshot counts them)."""
    corpus, counts = texts(), {}
    with Driver(worker, ctx.logs) as driver:
        for _ in range(12):
            n = 2 * processes
            driver.run("sentiment.analyze", [[t] for t in corpus[:64]], 2 * n, n)
            if batches:
                driver.run("sentiment.analyze_batch", [[corpus[i : i + 32]] for i in (0, 32)], n, n)
            driver.run("clustering.assign", [[CUSTOMERS]], n, n)
            driver.run("forecast.predict", [["co2_prophet", 6]], n, n)
            time.sleep(1.2)  # one heartbeat: fresh snapshots
            snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
            counts = {s["pid"]: s["models"]["sentiment"]["calls"] for s in snaps}
            if len(counts) >= processes and min(counts.values()) >= calls:
                break
    client = Client(worker)
    try:
        client.call("sentiment.analyze", [corpus[2]])
    finally:
        client.close()
    return counts


def measure_worker(
    ctx: Ctx, worker: Any, n: int, at_ready: bool = True, **touch: Any
) -> dict[str, Any]:
    """Total PSS at READY (``at_ready``) and after every process served requests."""
    with ctx.running(worker, ready_timeout=300):
        time.sleep(1.0)
        before = tree_memory(worker.pid) if at_ready else {"total_pss_mib": None}
        counts = touch_worker(ctx, worker, n, **touch)
        time.sleep(0.5)
        mem = tree_memory(worker.pid)
        mem["sentiment_calls_per_process"] = counts
        mem["at_ready"] = {
            k: before.get(k) for k in ("total_pss_mib", "total_private_mib", "unique_resident_mib")
        }
        snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
        mem["backend"] = sorted(
            {str(s["models"]["sentiment"].get("details", {}).get("backend")) for s in snaps}
        )
    return mem


def run(ctx: Ctx) -> dict[str, Any]:
    models = repository("minilm", sentiment=MINILM_DIR)
    raw: dict[str, Any] = {"baseline": [], "workers": {}}
    jobs = {"sentiment": texts()[1], "clustering": CUSTOMERS, "predict": ["co2_prophet", 6]}

    def baseline() -> None:
        with ctx.helper(models, threads=2) as helper:
            helper.cmd("touch", jobs=jobs, times=4)
            time.sleep(0.5)
            raw["baseline"].append(tree_memory(helper.pid))

    baseline()
    for mode in ["parent", "child"] if not ctx.quick else ["parent"]:
        for n in [1, 2, 4] if not ctx.quick else [2]:
            env = {"MODEL_REPOSITORY": str(models), "PRELOAD_MODE": mode}
            raw["workers"][f"{mode}_c{n}"] = measure_worker(
                ctx, ctx.worker(concurrency=n, env=env), n
            )
    if not ctx.quick:  # one Celery process serving the same models: Celery's consumer included
        worker = ctx.worker(concurrency=1, pool="solo", env={"MODEL_REPOSITORY": str(models)})
        raw["workers"]["solo_c1"] = measure_worker(ctx, worker, 1, at_ready=False)
    baseline()
    base = med([b["total_pss_mib"] for b in raw["baseline"]])
    base_unique = med([b["unique_resident_mib"] or 0 for b in raw["baseline"]]) or None
    summary: dict[str, Any] = {
        "baseline: one python process, PSS MiB (distinct)": f"{base:.0f} ({base_unique})"
    }
    pss = {key: mem["total_pss_mib"] for key, mem in raw["workers"].items()}
    for key, mem in raw["workers"].items():
        private = [f"{p['private_mib']:.0f}" for p in mem["processes"]]  # the main process first
        unique = mem["unique_resident_mib"]
        uratio = f"{unique / base_unique:.2f}x" if unique and base_unique else "-"
        summary[f"{key}: total PSS MiB (x baseline); distinct resident x; at READY"] = (
            f"{pss[key]:.0f} ({pss[key] / base:.2f}x); {uratio}; {mem['at_ready']['total_pss_mib']}"
        )
        summary[f"{key}: private MiB main / per child"] = f"{private[0]} / {', '.join(private[1:])}"
        if "solo_c1" in pss and key.startswith("parent_c"):
            summary[f"{key} / one Celery process (solo pool)"] = rnd(pss[key] / pss["solo_c1"])
    what = "total PSS, {} pool processes, copy-on-write / one plain process"
    targets = [
        target(what.format(n), pss[f"parent_c{n}"] / base, limit)
        for n, limit in ((2, 1.2), (4, 1.4))
        if f"parent_c{n}" in pss
    ]
    config = {"model": "MiniLM as sentiment + the shipped forecasting/clustering models"}
    config["measure"] = "Pss of /proc/PID/smaps_rollup over main + children; distinct = pagemap"
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}
