"""Memory: a worker's total PSS by pool size and preload mode vs one process; torch vs ONNX."""

from __future__ import annotations

import itertools
import os
import time
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

from bench.data import CUSTOMERS, REAL_MODELS, minilm_onnx, repository, texts
from bench.driver import Client, Driver
from bench.helper import Helper
from bench.run import Ctx, med, pct, rnd, target


def tree_memory(root_pid: int) -> dict[str, Any]:
    """PSS and private memory (MiB, /proc/PID/smaps_rollup) of a process and its descendants."""
    import psutil

    root, rows = psutil.Process(root_pid), []
    for p in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            lines = Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines()
            kib = {x.split()[0]: int(x.split()[1]) for x in lines if x.endswith(" kB")}
            private = (kib.get("Private_Clean:", 0) + kib.get("Private_Dirty:", 0)) / 1024
            row = {"pid": p.pid, "role": "main" if p.pid == root_pid else "child"}
            pss = round(kib.get("Pss:", 0) / 1024, 1)
            rows.append(row | {"pss_mib": pss, "private_mib": round(private, 1)})
    return {
        "total_pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
        "unique_resident_mib": unique_resident_mib([r["pid"] for r in rows]),
        "processes": rows,
    }


def unique_resident_mib(pids: list[int]) -> float | None:
    """MiB of distinct physical pages resident in ``pids``: a check on PSS that other processes
    mapping the same libraries do not skew; None where page frame numbers are not readable."""
    import numpy as np

    page, frames = os.sysconf("SC_PAGE_SIZE"), [np.zeros(0, dtype=np.uint64)]
    try:
        for pid in pids:
            with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", 0) as pm:
                for line in (x for x in maps if "[vsyscall]" not in x):
                    lo, hi = map(partial(int, base=16), line.split()[0].split("-"))
                    pm.seek(lo // page * 8)
                    entries = np.frombuffer(pm.read((hi - lo) // page * 8), dtype=np.uint64)
                    present = entries[(entries >> np.uint64(63)) == 1]
                    frames.append(present & np.uint64((1 << 55) - 1))
    except (OSError, ValueError):
        return None
    found = np.concatenate(frames)
    return round(np.unique(found[found != 0]).size * page / 2**20, 1) if found.any() else None


def measure_worker(
    ctx: Ctx, worker: Any, n: int, at_ready: bool = True, calls: int = 3, batches: bool = False
) -> dict[str, Any]:
    """Total PSS at READY (``at_ready``) and once every pool process served ``calls`` sentiments."""
    corpus, counts = texts(), {}
    with ctx.running(worker, wait=False):
        ctx.ready(worker, timeout=300)
        time.sleep(1.0)
        before = tree_memory(worker.pid)["total_pss_mib"] if at_ready else None
        with Driver(worker, ctx.logs) as driver:
            for _ in range(12):
                driver.run("sentiment.analyze", [[t] for t in corpus[:64]], 4 * n, 2 * n)
                if batches:
                    jobs = [[corpus[i : i + 32]] for i in (0, 32)]
                    driver.run("sentiment.analyze_batch", jobs, 2 * n, 2 * n)
                driver.run("clustering.assign", [[CUSTOMERS]], 2 * n, 2 * n)
                driver.run("forecast.predict", [["co2_prophet", 6]], 2 * n, 2 * n)
                time.sleep(1.2)  # one heartbeat: fresh snapshots
                snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
                counts = {s["pid"]: s["models"]["sentiment"]["calls"] for s in snaps}
                if len(counts) >= n and min(counts.values()) >= calls:
                    break
        with Client(worker) as client:
            client.call("sentiment.analyze", [corpus[2]])
        time.sleep(0.5)
        mem = tree_memory(worker.pid)
        mem |= {"sentiment_calls_per_process": counts, "at_ready": {"total_pss_mib": before}}
        details = [s["models"]["sentiment"].get("details", {}) for s in worker.snapshots()]
        mem["backend"] = sorted({str(d.get("backend")) for d in details})
    return mem


def run(ctx: Ctx) -> dict[str, Any]:
    models = repository("minilm-onnx", sentiment=minilm_onnx())  # the default backend: ONNX
    raw: dict[str, Any] = {"baseline": [], "workers": {}}
    jobs = {"sentiment": texts()[1], "clustering": CUSTOMERS, "predict": ["co2_prophet", 6]}

    def baseline() -> None:
        with Helper(models, threads=2, logs=ctx.logs) as helper:
            for family, job in jobs.items():  # as the workers' processes do before measuring
                helper.latency(family, [job], 4)
            time.sleep(0.5)
            raw["baseline"].append(tree_memory(helper.pid))

    baseline()
    for mode in ["parent", "child"] if not ctx.quick else ["parent"]:
        for n in [1, 2, 4] if not ctx.quick else [2]:
            worker = ctx.worker(models, {"MODELWORKERS_PRELOAD_MODE": mode}, concurrency=n)
            raw["workers"][f"{mode}_c{n}"] = measure_worker(ctx, worker, n)
    if not ctx.quick:  # one Celery process serving the same models: Celery's consumer included
        worker = ctx.worker(models, concurrency=1, pool="solo")
        raw["workers"]["solo_c1"] = measure_worker(ctx, worker, 1, at_ready=False)
    baseline()
    base = med([b["total_pss_mib"] for b in raw["baseline"]])
    base_unique = med([b["unique_resident_mib"] or 0 for b in raw["baseline"]]) or None
    summary: dict[str, Any] = {}
    summary["baseline: one python process, PSS MiB (distinct)"] = f"{base:.0f} ({base_unique})"
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
    limits = {n: limit for n, limit in ((2, 1.2), (4, 1.4)) if f"parent_c{n}" in pss}
    targets = [target(what.format(n), pss[f"parent_c{n}"] / base, v) for n, v in limits.items()]
    config = {"model": "MiniLM as sentiment + the shipped forecasting/clustering models"}
    config["measure"] = "Pss of /proc/PID/smaps_rollup over main + children; distinct = pagemap"
    return {"raw": raw, "summary": summary, "targets": targets, "config": config}


def loaded(folder: Path, backend: str, threads: int) -> Any:
    import torch

    from shared.families.base import ModelContext
    from shared.families.transformers_sentiment import TransformersSentiment
    from shared.manifest import ModelSpec, artifact_sha256

    options = {"backend": backend.split("+")[0], "onnx_prepack": backend.endswith("+prepack")}
    spec = ModelSpec(name="bench", family="transformers", path=folder.name, options=options)
    spec = spec.model_copy(update={"sha256": artifact_sha256(folder), "location": str(folder)})
    torch.set_num_threads(threads)  # what a serving process does with its thread budget
    model = TransformersSentiment(spec, ModelContext(device="cpu", threads=threads))
    model.load()
    model.warmup()
    return model


def timed(model: Any, batch: int) -> float:
    """Over ``bench.data.texts()``: one text per call, p50 ms; batches, texts/s."""
    lat, t0 = [], time.perf_counter()
    for i in range(0, len(texts()), batch):
        t = time.perf_counter()
        model.classify(texts()[i : i + batch])
        lat.append(time.perf_counter() - t)
    return pct(lat, 50) * 1000 if batch == 1 else len(texts()) / (time.perf_counter() - t0)


def backend_speed(ctx: Ctx) -> dict[str, Any]:
    folders = {"tiny-bert": REAL_MODELS / "sentiment" / "1.0.0", "minilm": minilm_onnx()}
    raw: dict[str, Any] = {}
    for (label, folder), threads in itertools.product(folders.items(), (1, 2)):
        models = {b: loaded(folder, b, threads) for b in ("torch", "onnx", "onnx+prepack")}
        shapes = (("single_p50_ms", 1), ("batch32_texts_per_s", 32))[threads - 1 :]
        rounds = itertools.product(range(ctx.n(3, 1)), models.items(), shapes)
        for _, (backend, model), (name, batch) in rounds:
            key = f"{label}, {backend}, {threads} thread(s): {name}"
            raw.setdefault(key, []).append(ctx.measure(partial(timed, model, batch)))
    return {"raw": raw, "summary": {k: rnd(med(v), 2) for k, v in raw.items()}}


def backend_memory(ctx: Ctx) -> dict[str, Any]:
    repos = {"shipped": REAL_MODELS, "minilm": repository("minilm-onnx", sentiment=minilm_onnx())}
    raw: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for (label, repo), n, backend in itertools.product(repos.items(), (1, 2, 4), ("torch", "onnx")):
        worker = ctx.worker(repo, {"MODELWORKERS_TRANSFORMERS_BACKEND": backend}, concurrency=n)
        key = f"{label}, {n} process(es), {backend}"
        mem = raw[key] = measure_worker(ctx, worker, n, at_ready=False, calls=6, batches=True)
        private = [p["private_mib"] for p in mem["processes"] if p["role"] == "child"]
        what = f"{key}: total PSS MiB (distinct) / private per child"
        summary[what] = f"{mem['total_pss_mib']:.0f} ({mem['unique_resident_mib']}) / {private}"
    return {"raw": raw, "summary": summary}
