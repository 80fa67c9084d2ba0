"""Section 5, memory: total PSS of a worker (main process + pool processes) with 1, 2, 4 pool
processes, copy-on-write (PRELOAD_MODE=parent) vs child mode, MiniLM as sentiment, after each
process served requests; vs one plain Python process serving the same models."""

from __future__ import annotations

import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from bench.context import Ctx, med, rnd
from bench.data import CUSTOMERS, bench_manifest, texts
from bench.driver import Client, Driver
from bench.report import target


# ---- memory of a process tree ----------------------------------------------------------------
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

    root = psutil.Process(root_pid)
    rows = []
    for p in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            s = smaps_rollup(p.pid)
            private = s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)
            rows.append(
                {
                    "pid": p.pid,
                    "role": "main" if p.pid == root_pid else "child",
                    "pss_mib": round(s.get("Pss", 0) / 1024, 1),
                    "private_mib": round(private / 1024, 1),
                    "rss_mib": round(s.get("Rss", 0) / 1024, 1),
                }
            )
    return {
        "total_pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
        "total_private_mib": round(sum(r["private_mib"] for r in rows), 1),
        "unique_resident_mib": unique_resident_mib([r["pid"] for r in rows]),
        "processes": rows,
    }


def private_breakdown(pid: int, top: int = 8) -> dict[str, float]:
    """Private memory (clean + dirty, MiB) of one process by mapping: [heap], anonymous, files."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anonymous]"
                name = os.path.basename(name) if name.startswith("/") else name
            elif head in ("Private_Clean:", "Private_Dirty:"):
                sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v / 1024, 1) for k, v in ranked}


def unique_resident_mib(pids: list[int]) -> float | None:
    """Distinct physical pages resident in any of ``pids`` (each shared page counted once,
    whoever else maps it): a check on PSS that does not depend on other processes of the
    machine that map the same libraries. None where page frame numbers are not readable."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    chunks = [np.zeros(0, dtype=np.uint64)]
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


# ---- the section ------------------------------------------------------------------------------
def touch_jobs() -> dict[str, Any]:
    return {"sentiment": texts()[1], "clustering": CUSTOMERS, "predict": ["co2_prophet", 6]}


def touch_worker(ctx: Ctx, worker: Any, processes: int, calls: int = 3) -> dict[int, int]:
    """Send bursts until every pool process has served ``calls`` sentiment tasks (its snapshot
    counts them), plus a few clustering / forecast.predict tasks."""
    corpus = texts()
    driver, client = Driver(worker, ctx.logs), Client(worker)
    counts: dict[int, int] = {}
    try:
        for _ in range(12):
            n = 2 * processes
            driver.run("sentiment.analyze", [[t] for t in corpus[:64]], 2 * n, n)
            driver.run("clustering.assign", [[CUSTOMERS]], n, n)
            driver.run("forecast.predict", [["co2_prophet", 6]], n, n)
            time.sleep(1.2)  # one heartbeat: fresh snapshots
            snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
            counts = {s["pid"]: s["models"]["sentiment"]["calls"] for s in snaps}
            if len(counts) >= processes and min(counts.values()) >= calls:
                break
        client.call("sentiment.analyze", [corpus[2]])
    finally:
        driver.close()
        client.close()
    return counts


def measure_worker(ctx: Ctx, worker: Any, n: int, at_ready: bool = True) -> dict[str, Any]:
    """Total PSS at READY (``at_ready``) and after every process served requests."""
    with ctx.running(worker, ready_timeout=300):
        time.sleep(1.0)
        before = tree_memory(worker.pid) if at_ready else {"total_pss_mib": None}
        counts = touch_worker(ctx, worker, n)
        time.sleep(0.5)
        mem = tree_memory(worker.pid)
        mem["sentiment_calls_per_process"] = counts
        keys = ("total_pss_mib", "total_private_mib", "unique_resident_mib")
        mem["at_ready"] = {k: before[k] for k in keys if k in before}
        if at_ready:
            mem["private_by_mapping"] = {
                f"{p['role']}:{p['pid']}": private_breakdown(p["pid"]) for p in mem["processes"][:2]
            }
    return mem


def run(ctx: Ctx) -> dict[str, Any]:
    manifest = bench_manifest("eager-minilm", sentiment="minilm")
    raw: dict[str, Any] = {"baseline": [], "workers": {}}

    def baseline() -> None:
        with ctx.helper(manifest, threads=2) as helper:
            helper.cmd("touch", jobs=touch_jobs(), times=4)
            time.sleep(0.5)
            mem = tree_memory(helper.pid)
            mem["private_by_mapping"] = private_breakdown(helper.pid)
            raw["baseline"].append(mem)

    baseline()
    for mode in ["parent", "child"] if not ctx.quick else ["parent"]:
        for n in [1, 2, 4] if not ctx.quick else [2]:
            env = {"MODEL_REPOSITORY": str(manifest), "PRELOAD_MODE": mode}
            raw["workers"][f"{mode}_c{n}"] = measure_worker(
                ctx, ctx.worker(concurrency=n, env=env), n
            )
    if not ctx.quick:
        # one Celery process serving the same models (solo pool): the product's own
        # one-process figure, Celery's consumer included, beside the plain-process baseline
        worker = ctx.worker(concurrency=1, pool="solo", env={"MODEL_REPOSITORY": str(manifest)})
        raw["workers"]["solo_c1"] = measure_worker(ctx, worker, 1, at_ready=False)
    baseline()
    base_pss = med([b["total_pss_mib"] for b in raw["baseline"]])
    base_unique = med([b["unique_resident_mib"] or 0 for b in raw["baseline"]]) or None
    summary: dict[str, Any] = {
        "baseline: one python process, PSS MiB": rnd(base_pss, 1),
        "baseline: distinct resident MiB": base_unique,
    }
    table: dict[str, Any] = {}
    for key, mem in raw["workers"].items():
        children = [p for p in mem["processes"] if p["role"] == "child"]
        main = next(p for p in mem["processes"] if p["role"] == "main")
        ratio = mem["total_pss_mib"] / base_pss
        unique = mem["unique_resident_mib"]
        uratio = unique / base_unique if unique and base_unique else None
        table[key] = {
            "total_pss_mib": mem["total_pss_mib"],
            "pss_ratio": rnd(ratio),
            "unique_resident_mib": unique,
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
    for n in (2, 4):
        if "solo_c1" in table and f"parent_c{n}" in table:
            summary[f"parent_c{n} / one Celery process (solo pool) serving the same models"] = rnd(
                table[f"parent_c{n}"]["total_pss_mib"] / table["solo_c1"]["total_pss_mib"]
            )
    targets = [
        target(
            f"total PSS, {n} pool processes, copy-on-write / one plain process",
            table[f"parent_c{n}"]["pss_ratio"],
            limit,
        )
        for n, limit in ((2, 1.2), (4, 1.4))
        if f"parent_c{n}" in table
    ]
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


# ---- transformers backends (python -m bench.backends --memory) ---------------------------------
def backend_pss(
    repository: Any, backend: str, processes: int, logs: Any, redis_url: str
) -> dict[str, Any]:
    """Total PSS (MiB) of a prefork worker (default PRELOAD_MODE: copy-on-write on a CPU) on
    ``repository`` with TRANSFORMERS_BACKEND=``backend``, after every pool process answered
    sentiment tasks (bursts of single texts and batches of 32, until each served 6 calls)."""
    from harness import WorkerProcess, close_app, wait_for

    env = {"MODEL_REPOSITORY": str(repository), "TRANSFORMERS_BACKEND": backend}
    worker = WorkerProcess(redis_url, concurrency=processes, env=env, log_dir=logs).start()
    try:
        snaps = worker.wait_ready(processes, timeout=300)
        client, corpus = worker.app(), texts()
        try:

            def served() -> bool:  # bursts, so that every pool process gets some
                sent = [
                    client.send_task("sentiment.analyze", args=[corpus[i]])
                    for i in range(4 * processes)
                ] + [
                    client.send_task("sentiment.analyze_batch", args=[corpus[i : i + 32]])
                    for i in range(0, 64 * processes, 32)
                ]
                for result in sent:
                    result.get(timeout=120)
                time.sleep(1.2)  # a heartbeat: fresh counters
                calls = [s["models"]["sentiment"]["calls"] for s in worker.snapshots()]
                return len(calls) >= processes and min(calls) >= 6

            wait_for(served, 600, "every pool process to serve sentiment", interval=0)
        finally:
            close_app(client)
        mem = tree_memory(worker.pid)
        children = [p for p in mem["processes"] if p["role"] == "child"]
        return {
            "total_pss_mib": mem["total_pss_mib"],
            "unique_resident_mib": mem["unique_resident_mib"],
            "main_pss_mib": next(p["pss_mib"] for p in mem["processes"] if p["role"] == "main"),
            "child_private_mib": [p["private_mib"] for p in children],
            "backend": {s["models"]["sentiment"]["details"]["backend"] for s in snaps}.pop(),
        }
    finally:
        worker.stop()


def backend_memory(minilm: Path) -> dict[str, Any]:
    """backend_pss of 1, 2 and 4 processes per backend, on the shipped repository and on a
    copy of it whose sentiment model is the MiniLM classifier (its folder ``minilm``)."""
    import shutil
    import tempfile

    from bench.data import CACHE, ROOT
    from shared.repository import update_sha256
    from workers.embedded import EmbeddedRedis

    repo = CACHE / "memory-minilm"  # the shipped models, sentiment = MiniLM
    if not (repo / "sentiment" / "minilm" / "model.onnx").exists():
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(ROOT / "models", repo, ignore=shutil.ignore_patterns("cache"))
        shutil.rmtree(repo / "sentiment")
        shutil.copytree(minilm, repo / "sentiment" / "minilm")
        (repo / "sentiment" / "model.toml").write_text(
            'family = "transformers"\nrequired = false\nfallback = "textblob"\n\n'
            '[[versions]]\nversion = "minilm"\npath = "minilm"\nsha256 = ""\n'
        )
        update_sha256(repo, repo / "sentiment" / "minilm")
    from celery.result import AsyncResult

    # results left for the last garbage collection would try to unsubscribe from a Redis that
    # is gone, retrying for ever (tests/conftest.py does the same)
    AsyncResult.__del__ = lambda self: None  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as logs:
        for label, folder in (("shipped", ROOT / "models"), ("minilm", repo)):
            for n in (1, 2, 4):
                for backend in ("torch", "onnx"):
                    key = f"{label}, {n} process(es), {backend}"
                    out[key] = backend_pss(folder, backend, n, Path(logs), redis.url)
                    print(key, out[key], flush=True)
    return out
