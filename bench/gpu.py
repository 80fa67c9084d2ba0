"""``bench.run --gpu`` (``--cpu-check``: on a CPU), each section skipped when out of budget."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack, suppress
from functools import partial
from pathlib import Path
from typing import Any

from bench.data import CACHE, REAL_MODELS, ensure_minilm, repository, texts
from bench.driver import Client, Driver
from bench.helper import Helper
from bench.overhead import one_round
from bench.run import CORES, Ctx, med, ready_time

SINGLE = [[t] for t in texts()]
THREADS = {"MODELWORKERS_BATCH_MAX_SIZE": "256", "MODELWORKERS_BATCH_WINDOW_MS": "2"}
_state: dict[str, Any] = {}  # the run's repositories and in-process helper, made once


def cuda_evidence(pid: int) -> dict[str, bool]:
    """libcuda mapped; /dev/nvidia-uvm open (cuInit opens it: a CUDA context)."""
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    return {"libcuda_mapped": "libcuda.so" in maps, "nvidia_uvm_open": "/dev/nvidia-uvm" in fds}


def setup(ctx: Ctx) -> dict[str, Any]:
    """Repositories of one required sentiment model each (tiny-bert; MiniLM, random weights)."""
    if not _state:
        tiny = REAL_MODELS / "sentiment" / "1.0.0"
        minilm = ensure_minilm(CACHE / "minilm-rand", "--random", str(CACHE / "minilm-gpu-src"))
        kw: dict[str, Any] = {"only": ("sentiment",), "strict": True}
        both = {"tiny": tiny, "minilm": minilm}
        _state["models"] = {k: repository(f"gpu-{k}", sentiment=v, **kw) for k, v in both.items()}
        inproc = repository("gpu-inproc", sentiment=tiny, extra={"minilm": minilm}, **kw)
        _state["helper"] = helper = Helper(inproc, threads=CORES, logs=ctx.logs, raw_model=minilm)
        if ctx.device == "cuda" and not helper.first["cuda_available"]:
            raise RuntimeError("torch.cuda.is_available() is False in the in-process helper")
        ctx.results["meta"]["inproc"] = helper.first
    return _state


def started(ctx: Ctx, stack: ExitStack, model: str, processes: int, **kw: Any) -> Any:
    """A worker of ``model``, READY (seconds in ``worker.ready_s``), stopped with ``stack``."""
    kw.setdefault("concurrency", processes)
    worker = ctx.worker(setup(ctx)["models"][model], **kw)
    t_launch, timeout = time.time(), max(20.0, min(150.0, ctx.left()))
    stack.enter_context(ctx.running(worker, wait=False))
    worker.ready_s = ready_time(worker, processes, t_launch, timeout)["observed_s"]
    return worker


def prefork_part(ctx: Ctx, model: str, processes: int, out: dict[str, Any]) -> None:
    helper, name = setup(ctx)["helper"], {"tiny": "sentiment", "minilm": "minilm"}[model]
    with ExitStack() as stack:
        env = {"MODELWORKERS_TORCH_THREADS": str(max(1, CORES // processes))}
        worker = started(ctx, stack, model, processes, env=env)
        client = stack.enter_context(Client(worker))
        client.warm()  # the client's own connections first: the worker is measured
        first_ms = client.call("sentiment.analyze", [texts()[0]], timeout=60)[0]
        jobs = [([t], {}) for t in texts()[1:]]
        warm = med(client.sequential("sentiment.analyze", jobs, ctx.n(40, 8))[1:])
        snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
        devices = out["children"] = [s["models"]["sentiment"]["device"] for s in snaps]
        cuda = [any(cuda_evidence(s["pid"]).values()) for s in snaps]
        out["parent"] = cuda_evidence(worker.pid)  # libcuda mapped by its imports: no context
        remote = [client.call("sentiment.analyze", [t], timeout=30)[1] for t in texts()[:8]]
        local = helper.cmd("answers", texts=texts()[:8], model=name)["answers"]
        pairs = list(zip(remote, local, strict=True))
        diff = max(abs(float(r["score"]) - float(score)) for r, (_, score) in pairs)
        labels = all(r["label"] == label and not r["fallback"] for r, (label, _) in pairs)
        rec: dict[str, Any] = out.setdefault("raw", {})
        for _ in range(ctx.n(4, 2)):
            one_round(ctx, helper, client, "sentiment", ctx.n(50, 10), rec, model=name)
        a, b = med(rec["inproc_ms"]), med(rec["celery_ms"])
        driver = stack.enter_context(Driver(worker, ctx.logs))
        for size, tasks in ((32, ctx.n(32, 2)), (256, ctx.n(8, 1))) if processes == 1 else ():
            jobs = [[(texts() * 2)[i : i + size]] for i in range(0, 512, size)]
            driver.run("sentiment.analyze_batch", jobs, 2, 2, timeout=120)  # warm
            seconds = driver.run("sentiment.analyze_batch", jobs, tasks, 2, timeout=180)["seconds"]
            out["summary"][f"analyze_batch {size} texts/s"] = round(tasks * size / seconds, 1)
    parent_ok = not out["parent"]["nvidia_uvm_open"]
    ok = devices == [ctx.device] * processes and (ctx.device == "cpu" or all(cuda))
    out["ok"] = bool(ok and parent_ok and labels and diff <= 1e-3)
    out["summary"] |= {
        "READY s, devices, parent CUDA-free": f"{worker.ready_s:.2f}, {devices}, {parent_ok}",
        "answers = in-process (labels, max |score diff|)": f"{labels} ({diff:.2e})",
        "first task / warm p50 ms": f"{first_ms:.2f} / {warm:.2f} ({first_ms / warm:.2f}x)",
        "p50 ms in-process vs Celery": f"{a:.2f} vs {b:.2f} (+{b - a:.2f})",
    }


def gpu_prefork(ctx: Ctx, out: dict[str, Any]) -> None:
    for model, processes in (("tiny", 1), ("tiny", 2), ("minilm", 1)):
        part = out[f"{model}_c{processes}"] = {"summary": {}}
        prefork_part(ctx, model, processes, part)
        out["summary"] |= {f"{model} -c {processes}: {k}": v for k, v in part["summary"].items()}
    out["ok"] = all(v["ok"] for k, v in out.items() if k != "summary")


def gpu_raw(ctx: Ctx, out: dict[str, Any]) -> None:
    helper, rounds = setup(ctx)["helper"], ctx.n(3, 1)
    for batch, count in ((1, ctx.n(256, 16)), (32, ctx.n(512, 64)), (256, ctx.n(1024, 256))):
        args = {"texts": (texts() * (count // 512 + 1))[:count], "batch": batch, "rounds": rounds}
        res = out[f"batch_{batch}"] = helper.cmd("raw_throughput", max(60, ctx.left()), **args)
        out["summary"][f"MiniLM batch {batch} texts/s"] = round(max(res["rates"]), 1)


def gpu_pool_batching(ctx: Ctx, out: dict[str, Any]) -> None:
    """The default pool on the GPU: prefork -c 2, 64 single texts in flight, pool batching on
    and off (each pool process holds its own CUDA context)."""
    for label, env in (("on", {}), ("off", {"MODELWORKERS_POOL_BATCHING": "false"})):
        with ExitStack() as stack:
            worker = started(ctx, stack, "minilm", 2, env=env)
            driver = stack.enter_context(Driver(worker, ctx.logs, 2))
            driver.run("sentiment.analyze", SINGLE, ctx.n(256, 32), 64, timeout=60)  # warm
            res = out[label] = driver.run("sentiment.analyze", SINGLE, ctx.n(2048, 64), 64)
        key = f"prefork -c 2, pool batching {label}, 64 in flight: texts/s, p50 ms"
        out["summary"][key] = f"{res['tasks_per_s']:.0f}, {res['p50_ms']:.2f}"


def points(ctx: Ctx, task: str, pairs: Any, out: dict[str, Any], nodes: list[Any], k: int) -> None:
    """Tasks/s at each (in flight, total) from ``k`` driver processes; the mean micro-batch."""
    with Driver(nodes[0], ctx.logs, k) as driver:
        for inflight, total in pairs:
            driver.run(task, SINGLE, min(total, 256), inflight, timeout=60)  # warm
            with ctx.block():
                res = driver.run(task, SINGLE, total, inflight, timeout=120)
            key = f"{task}, {inflight} in flight, {len(nodes)} worker(s): tasks/s, p50 ms"
            out[f"{task} {inflight}"] = res
            out["summary"][key] = f"{res['tasks_per_s']:.0f}, {res['p50_ms']:.2f}"
    snaps = [s for w in nodes for s in w.snapshots() if s.get("node") == w.node]
    stats = [(s.get("stats") or {}).get("sentiment_batching") or {} for s in snaps]
    if batches := sum(b.get("batches", 0) for b in stats):
        key = f"mean micro-batch, {len(nodes)} worker(s)"
        out["summary"][key] = round(sum(b.get("items", 0) for b in stats) / batches, 2)


def gpu_threads(ctx: Ctx, out: dict[str, Any]) -> None:
    k, kw = 2 if ctx.device == "cpu" else 4, {"concurrency": 256, "pool": "threads", "env": THREADS}
    with ExitStack() as stack:
        worker = started(ctx, stack, "minilm", 1, **kw)
        client = stack.enter_context(Client(worker))
        lone = client.sequential("sentiment.analyze", [([t], {}) for t in texts()], ctx.n(30, 6))
        out["summary"]["threads -c 256: lone request p50 ms"] = round(med(lone[3:]), 2)
        pairs = ((64, ctx.n(2048, 64)), (ctx.n(256, 32), ctx.n(4096, 128)))
        points(ctx, "sentiment.analyze", pairs, out, [worker], k)
    with ExitStack() as stack:  # the ceiling: a task without a model on the same pool
        worker = started(ctx, stack, "tiny", 1, app="bench.exp_app", **kw)
        points(ctx, "bench.noop", ((ctx.n(256, 32), ctx.n(4096, 128)),), out, [worker], k)
    with ExitStack() as stack:  # four threads-pool workers (one queue) sharing the device
        kw |= {"concurrency": 128, "prefix": (prefix := f"gpux4-{uuid.uuid4().hex[:6]}")}
        nodes = [f"{prefix}-{i}@gpu" for i in range(4)]
        workers = [started(ctx, stack, "minilm", 1, node=node, **kw) for node in nodes]
        pairs = ((ctx.n(256, 16), ctx.n(4096, 64)), (ctx.n(1024, 32), ctx.n(8192, 128)))
        points(ctx, "sentiment.analyze", pairs, out, workers, 2 * k)


def section(need_s: float, fn: Callable[[Ctx, dict[str, Any]], None], ctx: Ctx) -> dict[str, Any]:
    """A GPU section, skipped when less than ``need_s`` of the budget is left."""
    if ctx.left() < need_s:
        return {"skipped": f"{ctx.left():.0f} s of budget left"}
    fn(ctx, out := {"summary": {}})
    return out


def close(ctx: Ctx, out: dict[str, Any]) -> None:  # the last section: the helper stops
    if helper := _state.pop("helper", None):
        helper.close()
    out["summary"]["device"] = ctx.results["meta"]["machine"]["gpu"] or ctx.device


SECTIONS = {
    "gpu_prefork": partial(section, 90, gpu_prefork),
    "gpu_raw": partial(section, 15, gpu_raw),
    "gpu_pool_batching": partial(section, 45, gpu_pool_batching),
    "gpu_threads": partial(section, 60, gpu_threads),
    "gpu_close": partial(section, -float("inf"), close),
}
