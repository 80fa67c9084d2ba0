"""The GPU profile of ``bench.run`` (``--gpu``; ``--cpu-check``: the same on a CPU with tiny
counts): the sentiment half of the suite on real workers with ``MODEL_DEVICE=cuda``, on the same
driver, in-process helper and report. Each section is skipped when ``--budget`` runs short.

* gpu_prefork: tiny-bert at -c 1 and -c 2, MiniLM at -c 1: every pool process READY with its
  model on the device while the worker's main process never initialised CUDA (``/proc/PID/maps``,
  open ``/dev/nvidia*``); answers equal the in-process ones; first task vs warm p50; p50/p99
  through Celery vs in-process (``overhead.one_round``); ``analyze_batch`` of 32 and 256 texts.
* gpu_raw: the raw batched forward pass in-process (batch 1/32/256).
* gpu_threads: the micro-batching threads pool at 64 and 256 in flight, a task without a model on
  the same pool (the ceiling of one worker's Celery), four such workers sharing the device.

MiniLM has seeded random weights built from ``bench/.cache/minilm-gpu-src`` (its config and
tokenizer, made by gpu_prepare.sh): the same shapes, so the same time per forward pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

from bench.data import CACHE, REAL_MODELS, ROOT, repository, texts
from bench.driver import Client, Driver
from bench.helper import Helper, clean_env
from bench.overhead import one_round
from bench.run import CORES, Ctx, med, pct, ready_time

MINILM_SRC = CACHE / "minilm-gpu-src"
SINGLE = [[t] for t in texts()]
THREADS = {"BATCH_MAX_SIZE": "256", "BATCH_WINDOW_MS": "2"}
_state: dict[str, Any] = {}  # the run's repositories and in-process helper, made once
READY: dict[str, float] = {}  # node -> seconds from its launch to READY


def stats(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(med(ms), 3), "p99_ms": round(pct(ms, 99), 3)}


def cuda_evidence(pid: int) -> dict[str, Any]:
    """libcuda mapped, /dev/nvidia* open (cuInit opens nvidiactl and nvidia-uvm)."""
    maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    nvidia = sorted({f for f in fds if f.startswith("/dev/nvidia")})
    uvm = any("uvm" in f for f in nvidia)
    return {"libcuda_mapped": "libcuda.so" in maps, "nvidia_uvm_open": uvm, "dev_nvidia": nvidia}


def setup(ctx: Ctx) -> dict[str, Any]:
    """The repositories (tiny-bert; MiniLM with random weights), each sentiment only, required and
    without a fallback (one would hide a failure), and the in-process helper with both."""
    if not _state:
        tiny = REAL_MODELS / "sentiment" / "1.0.0"
        minilm = CACHE / "minilm-rand"
        cmd = [sys.executable, "-m", "bench.data", "build-minilm", str(minilm), "--random"]
        env = clean_env({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
        subprocess.run([*cmd, str(MINILM_SRC)], cwd=ROOT, env=env, check=True, timeout=300)
        _state["models"] = {
            "tiny": repository("gpu-tiny", sentiment=tiny, only=("sentiment",), strict=True),
            "minilm": repository("gpu-minilm", sentiment=minilm, only=("sentiment",), strict=True),
        }
        inproc = repository(
            "gpu-inproc", sentiment=tiny, only=("sentiment",), strict=True, extra={"minilm": minilm}
        )
        _state["helper"] = Helper(inproc, threads=CORES, logs=ctx.logs, raw_model=minilm)
        if ctx.device == "cuda" and not _state["helper"].first["cuda_available"]:
            raise RuntimeError("torch.cuda.is_available() is False in the in-process helper")
        ctx.results["meta"]["inproc"] = _state["helper"].first
    return _state


def started(ctx: Ctx, stack: ExitStack, model: str, processes: int, **kw: Any) -> Any:
    """A worker of ``model``, READY (seconds in ``READY[worker.node]``), stopped with ``stack``."""
    env = {"MODEL_REPOSITORY": str(setup(ctx)["models"][model]), **kw.pop("env", {})}
    worker = ctx.worker(concurrency=kw.pop("concurrency", processes), env=env, **kw)
    timeout = max(20.0, min(150.0, ctx.left()))
    t_launch = time.time()
    stack.enter_context(ctx.running(worker, wait=False))
    READY[worker.node] = ready_time(worker, processes, t_launch, timeout)["observed_s"]
    return worker


def prefork_part(ctx: Ctx, model: str, processes: int, out: dict[str, Any]) -> None:
    """One prefork worker: devices and CUDA per process, answers = in-process, first task vs warm,
    latency vs in-process, then analyze_batch texts/s (-c 1)."""
    helper, name = setup(ctx)["helper"], {"tiny": "sentiment", "minilm": "minilm"}[model]
    with ExitStack() as stack:
        threads = str(max(1, CORES // processes))
        worker = started(ctx, stack, model, processes, env={"TORCH_THREADS": threads})
        client = Client(worker)
        stack.callback(client.close)
        client.warm()  # the client's own connections first: the worker is measured
        first_ms, _ = client.call("sentiment.analyze", [texts()[0]], timeout=60)
        warm = client.sequential(
            "sentiment.analyze", [([t], {}) for t in texts()[1:]], ctx.n(40, 8)
        )
        out["ready_s"], out["first_ms"], out["warm"] = READY[worker.node], first_ms, stats(warm[1:])
        snaps = [s for s in worker.snapshots() if s.get("node") == worker.node]
        children = {
            s["pid"]: (s["models"]["sentiment"]["device"], cuda_evidence(s["pid"])) for s in snaps
        }
        parent = cuda_evidence(worker.pid)
        sample = texts()[:8]
        remote = [client.call("sentiment.analyze", [t], timeout=30)[1] for t in sample]
        local = helper.cmd("answers", texts=sample, model=name)["answers"]
        pairs = list(zip(remote, local, strict=True))
        diff = max(abs(float(r["score"]) - float(score)) for r, (_, score) in pairs)
        labels = all(r["label"] == label and not r["fallback"] for r, (label, _) in pairs)
        rec: dict[str, Any] = {}
        for _ in range(ctx.n(4, 2)):
            one_round(ctx, helper, client, "sentiment", ctx.n(50, 10), rec, model=name)
        out["latency"] = {"inproc": stats(rec["inproc_ms"]), "celery": stats(rec["celery_ms"])}
        if processes == 1:
            with Driver(worker, ctx.logs) as driver:
                for size, tasks in ((32, ctx.n(32, 2)), (256, ctx.n(8, 1))):
                    jobs = [
                        [(texts() * (size // 512 + 1))[i : i + size]] for i in range(0, 512, size)
                    ]
                    driver.run("sentiment.analyze_batch", jobs, 2, 2, timeout=120)  # warm
                    res = driver.run("sentiment.analyze_batch", jobs, tasks, 2, timeout=180)
                    out[f"analyze_batch_{size}_texts_per_s"] = round(
                        tasks * size / res["seconds"], 1
                    )
    out["parent"], out["children"] = parent, children
    devices = [d for d, _ in children.values()]
    cuda = [e["nvidia_uvm_open"] or e["libcuda_mapped"] for _, e in children.values()]
    parent_ok = not parent["nvidia_uvm_open"]  # libcuda mapped by the imports is not a context
    ok = devices == [ctx.device] * processes and (ctx.device == "cpu" or all(cuda))
    out["ok"] = bool(ok and parent_ok and labels and diff <= 1e-3)
    a, b, warm_p50 = (
        out["latency"]["inproc"]["p50_ms"],
        out["latency"]["celery"]["p50_ms"],
        out["warm"]["p50_ms"],
    )
    out["summary"] = {
        "READY s / devices / parent CUDA-free": f"{READY[worker.node]:.2f}/{devices}/{parent_ok}",
        "answers = in-process (labels, max |score diff|)": f"{labels} ({diff:.2e})",
        "first task / warm p50 ms": f"{first_ms:.2f} / {warm_p50:.2f} ({first_ms / warm_p50:.2f}x)",
        "p50 ms in-process vs Celery": f"{a:.2f} vs {b:.2f} (+{b - a:.2f})",
    }


def section(need_s: float, fn: Any) -> Any:
    """A GPU section: skipped when less than ``need_s`` of the budget is left."""

    def run(ctx: Ctx) -> dict[str, Any]:
        if ctx.left() < need_s:
            return {"skipped": f"{ctx.left():.0f} s of budget left"}
        out: dict[str, Any] = {"summary": {}}
        fn(ctx, out)
        return out

    return run


def gpu_prefork(ctx: Ctx, out: dict[str, Any]) -> None:
    for model, processes in (("tiny", 1), ("tiny", 2), ("minilm", 1)):
        part = out[f"{model}_prefork_c{processes}"] = {}
        prefork_part(ctx, model, processes, part)
        out["summary"] |= {f"{model} -c {processes}: {k}": v for k, v in part["summary"].items()}
        for size in (32, 256):
            if f"analyze_batch_{size}_texts_per_s" in part:
                key = f"{model} -c 1: analyze_batch {size} texts/s"
                out["summary"][key] = part[f"analyze_batch_{size}_texts_per_s"]
    out["ok"] = all(v["ok"] for k, v in out.items() if k != "summary" and isinstance(v, dict))


def gpu_raw(ctx: Ctx, out: dict[str, Any]) -> None:
    helper = setup(ctx)["helper"]
    for batch, count in ((1, ctx.n(256, 16)), (32, ctx.n(512, 64)), (256, ctx.n(1024, 256))):
        sample = (texts() * (count // 512 + 1))[:count]
        args = {"texts": sample, "batch": batch, "rounds": ctx.n(3, 1), "tokenizer": True}
        res = helper.cmd("raw_throughput", timeout=max(60.0, ctx.left()), **args)
        out[f"batch_{batch}"] = res
        tok = res["tokenizer_only_texts_per_s"]
        out["summary"][f"MiniLM batch {batch} texts/s (tokenizer only)"] = (
            f"{max(res['rates']):.0f} ({tok:.0f})"
        )


def points(
    ctx: Ctx, driver: Driver, task: str, pairs: Any, out: dict[str, Any], workers: list[Any]
) -> None:
    """Texts/s of single-text tasks at each (in flight, total), with the workers' micro-batches."""
    for inflight, total in pairs:
        driver.run(task, SINGLE, min(total, 256), inflight, timeout=60)  # warm
        with ctx.block():
            res = driver.run(task, SINGLE, total, inflight, timeout=120)
        out[f"inflight_{inflight}"] = res
        out["summary"][f"{task}, {inflight} in flight: tasks/s, p50 ms"] = (
            f"{res['tasks_per_s']:.0f}, {res['p50_ms']:.2f}"
        )
    if task == "sentiment.analyze":
        snaps = [s for w in workers for s in w.snapshots() if s.get("node") == w.node]
        stats_ = [(s.get("stats") or {}).get("sentiment_batching") or {} for s in snaps]
        items, batches = (sum(b.get(k, 0) for b in stats_) for k in ("items", "batches"))
        out["summary"][f"mean micro-batch, {len(workers)} worker(s)"] = (
            f"{items / batches:.2f}" if batches else "-"
        )


def gpu_threads(ctx: Ctx, out: dict[str, Any]) -> None:
    k = 2 if ctx.device == "cpu" else 4
    kw = {"concurrency": 256, "pool": "threads", "env": THREADS}
    with ExitStack() as stack:
        worker = started(ctx, stack, "minilm", 1, **kw)
        client = Client(worker)
        stack.callback(client.close)
        lone = client.sequential("sentiment.analyze", [([t], {}) for t in texts()], ctx.n(30, 6))
        out["lone_request"] = stats(lone[3:])
        out["summary"]["threads -c 256: lone request p50 ms"] = out["lone_request"]["p50_ms"]
        driver = stack.enter_context(Driver(worker, ctx.logs, k))
        pairs = ((64, ctx.n(2048, 64)), (ctx.n(256, 32), ctx.n(4096, 128)))
        points(ctx, driver, "sentiment.analyze", pairs, out, [worker])
    with ExitStack() as stack:  # the ceiling: a task without a model on the same pool
        worker = started(ctx, stack, "tiny", 1, app="bench.exp_app", **kw)
        driver = stack.enter_context(Driver(worker, ctx.logs, k))
        points(ctx, driver, "bench.noop", ((ctx.n(256, 32), ctx.n(4096, 128)),), out, [worker])
    prefix = f"gpux4-{uuid.uuid4().hex[:6]}"
    with ExitStack() as stack:  # four threads-pool workers (one queue) sharing the device
        kw |= {"concurrency": 128, "prefix": prefix}
        workers = [
            started(ctx, stack, "minilm", 1, node=f"{prefix}-{i}@gpu", **kw) for i in range(4)
        ]
        driver = stack.enter_context(Driver(workers[0], ctx.logs, 2 * k))
        pairs = ((ctx.n(256, 16), ctx.n(4096, 64)), (ctx.n(1024, 32), ctx.n(8192, 128)))
        out["x4"] = {"summary": {}}
        points(ctx, driver, "sentiment.analyze", pairs, out["x4"], workers)
        out["summary"] |= {f"4 workers: {k}": v for k, v in out["x4"].pop("summary").items()}


def gpu_close(ctx: Ctx) -> dict[str, Any]:
    """Stops the in-process helper (the last GPU section)."""
    if helper := _state.pop("helper", None):
        helper.close()
    return {"summary": {"device": ctx.device, "gpu": ctx.results["meta"]["machine"]["gpu"]}}


SECTIONS = {
    "gpu_prefork": section(90, gpu_prefork),
    "gpu_raw": section(15, gpu_raw),
    "gpu_threads": section(60, gpu_threads),
    "gpu_close": gpu_close,
}
GPU_DEFAULT = list(SECTIONS)
