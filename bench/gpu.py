"""The GPU run: ``python -m bench.gpu --out OUT/gpu.json [--cpu-check] [--budget S] [--only P]``.

The sentiment half of the suite on real workers with ``MODEL_DEVICE=cuda`` (``--cpu-check``:
``cpu`` and tiny counts, a smoke test on a CPU-only machine), on the suite's runner, driver,
helper and report. Each part ends within ``--budget`` seconds or is skipped:

* imports, tiny_prefork_c1/c2, minilm_prefork_c1: every pool process READY with its model on the
  device while the worker's main process never initialised CUDA (``/proc/PID/maps``, open
  ``/dev/nvidia*``, ``nvidia-smi``); Celery's answers equal the in-process ones; no forecasting or
  TextBlob library imported by ``import workers.app`` or a worker start; launch -> READY, first
  task vs warm p50, p50/p99 through Celery vs in-process; MiniLM texts/s through prefork -c 1.
* raw_inprocess, threads_pool, client_ceiling, threads_pool_x4: the raw batched forward pass
  (batch 1/32/256), the micro-batching threads pool, a task without a model on the same pool (what
  one worker's Celery carries), four threads-pool workers sharing the device.

MiniLM has seeded random weights built from ``bench/.cache/minilm-gpu-src`` (its config and
tokenizer, made by gpu_prepare.sh): the same shapes, so the same time per forward pass.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.context import CORES, Ctx, med, pct, ready_time
from bench.data import CACHE, REAL_MODELS, ROOT, texts
from bench.driver import Client, Driver
from bench.helper import Helper, clean_env
from bench.overhead import one_round
from bench.run import Runner

MINILM_SRC = CACHE / "minilm-gpu-src"
FORBIDDEN = ("prophet", "textblob", "nltk", "cmdstanpy")
ALSO_REPORTED = ("statsmodels", "sklearn", "flower", "tornado", "matplotlib")
SCORE_TOL = 1e-3
INPROC = {"tiny": "sentiment", "minilm": "minilm"}  # the in-process helper's name of a model
SINGLE = [[t] for t in texts()]  # one text per task
THREADS_ENV = {"BATCH_MAX_SIZE": "256", "BATCH_WINDOW_MS": "2"}
# run in a fresh interpreter: what importing the ML libraries alone maps (the parent's baseline)
BASELINE = """import json, os, torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
maps, fds = open("/proc/self/maps").read(), []
for fd in os.listdir("/proc/self/fd"):
    try:
        fds.append(os.readlink("/proc/self/fd/" + fd))
    except OSError:
        pass
print(json.dumps({"libcuda_mapped": "libcuda.so" in maps, "libtorch_cuda_mapped":
    "libtorch_cuda" in maps, "dev_nvidia_fds": sorted({f for f in fds if "/dev/nvidia" in f}),
    "cuda_initialized": torch.cuda.is_initialized()}))
"""
EVIDENCE = ("libcuda_mapped", "libtorch_cuda_mapped", "nvidia_uvm_open", "dev_nvidia_fds")


def stats(ms: list[float]) -> dict[str, Any]:
    return {"n": len(ms), "p50_ms": round(med(ms), 3), "p99_ms": round(pct(ms, 99), 3)}


def cuda_evidence(pid: int, gpu_pids: list[dict[str, Any]] | None) -> dict[str, Any]:
    """libcuda mapped, /dev/nvidia* open (cuInit opens nvidiactl and nvidia-uvm), listed by
    nvidia-smi as a compute process; None where not readable."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
        fds = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except OSError:
        return dict.fromkeys((*EVIDENCE, "in_nvidia_smi_compute_apps"))
    nvidia = sorted({f for f in fds if f.startswith("/dev/nvidia")})
    listed = None if gpu_pids is None else any(r["pid"] == pid for r in gpu_pids)
    return {
        "libcuda_mapped": "libcuda.so" in maps,
        "libtorch_cuda_mapped": "libtorch_cuda" in maps,
        "nvidia_uvm_open": any("uvm" in f for f in nvidia),
        "dev_nvidia_fds": nvidia,
        "in_nvidia_smi_compute_apps": listed,
    }


def gpu_compute_pids() -> list[dict[str, Any]] | None:
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        res = subprocess.run(query, capture_output=True, text=True, timeout=15, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[p.strip() for p in line.split(",")] for line in res.stdout.strip().splitlines()]
    return [{"pid": int(r[0]), "used_mib": r[1]} for r in rows if len(r) > 1 and r[0].isdigit()]


def import_chains(log_text: str, names: tuple[str, ...]) -> dict[str, list[str]]:
    """From ``PYTHONPROFILEIMPORTTIME`` output: for each package of ``names`` that was imported,
    the chain 'outermost import -> ... -> package' (a module's line comes after the lines of what
    it imported, one level deeper; a lazy import in a function shows up as an outermost one)."""
    rows = []
    for line in log_text.splitlines():
        if line.startswith("import time:") and line.count("|") >= 2:
            name = line.split("|", 2)[2].rstrip()
            if name.strip() not in ("", "imported package"):
                rows.append((len(name) - len(name.lstrip()), name.strip()))
    found: dict[str, list[str]] = {}
    for i, (level, name) in enumerate(rows):
        if name in names and name not in found:
            found[name] = [name]
            for indent, later in rows[i + 1 :]:
                if indent < level:
                    found[name].insert(0, later)
                    level = indent
    return found


def sentiment_manifest(folder: Path, models: dict[str, tuple[Path, str, str]]) -> Path:
    """A manifest of sentiment models only, each required and without a fallback (one would hide
    a failure): name -> (artifact, version, sha256), symlinked under ``folder``."""
    from harness import write_manifest

    folder.mkdir(parents=True)
    entries = []
    for name, (artifact, version, sha256) in models.items():
        (folder / name).symlink_to(artifact, target_is_directory=True)
        entry = {"name": name, "family": "transformers", "path": name, "version": version}
        entries.append({**entry, "sha256": sha256, "required": True, "lazy": False, "fallback": ""})
        entries[-1]["options"] = {"max_length": 128}
    return write_manifest(folder, entries)


class GpuRun:
    """The parts, their workers and the in-process helper (tiny-bert as ``sentiment``, MiniLM
    as ``minilm``) of one run."""

    def __init__(self, args: argparse.Namespace, ctx: Ctx, runner: Runner) -> None:
        self.args, self.ctx, self.runner, self.cpu = args, ctx, runner, args.cpu_check
        self.device = "cpu" if self.cpu else "cuda"
        self.deadline = time.monotonic() + args.budget
        self.tmp = Path(tempfile.mkdtemp(prefix="modelworkers-gpu-models-"))
        self.k = args.drivers or (2 if self.cpu else 4)
        self.manifests: dict[str, Path] = {}
        self.helper: Helper | None = None
        self.baseline: dict[str, Any] = {}
        self.sections = runner.results["sections"]

    def n(self, gpu: int, cpu: int) -> int:
        return cpu if self.cpu else gpu

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def part(self, name: str, fn: Callable[[dict[str, Any]], None], need_s: float) -> None:
        """``fn`` fills the part's entry, which is in the results file while it runs (what a
        part had when it was interrupted is kept)."""
        if self.args.only and name not in self.args.only:
            return
        if self.left() < need_s:
            self.sections[name] = {"skipped": f"{self.left():.0f} s of budget left"}
            self.runner.write()
            return
        entry: dict[str, Any] = {"summary": {}}

        def run(_ctx: Ctx) -> dict[str, Any]:
            self.sections[name] = entry
            fn(entry)
            return entry

        self.runner.section(self.ctx, name, run)

    def python(self, args: list[str], timeout: float, **env: str) -> Any:
        """The JSON of the last line ``python ARGS`` prints."""
        cmd, env = [sys.executable, *args], clean_env(env)
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.decode(errors="replace")[-3000:])
        return json.loads(res.stdout.decode().strip().splitlines()[-1])

    # -- setup -----------------------------------------------------------------------------
    def build_models(self) -> dict[str, Any]:
        from shared.manifest import artifact_sha256
        from shared.repository import load_repository

        real = next(s for s in load_repository(REAL_MODELS).active() if s.name == "sentiment")
        models = {"sentiment": (Path(real.location), real.version, real.sha256)}
        info: dict[str, Any] = {"tiny_bert": {"version": real.version, "sha256": real.sha256}}
        info["manifests"] = "sentiment only (required, no fallback), written under a temp dir"
        try:
            if not (MINILM_SRC / "config.json").exists():
                raise RuntimeError(f"{MINILM_SRC} is missing (carry bench/.cache/minilm-gpu-src)")
            target = self.tmp / "minilm-rand"
            build = ["-m", "bench.data", "build-minilm", str(target), "--random", str(MINILM_SRC)]
            no_gpu = {"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # none needed
            info["minilm"] = self.python(build, 180, **no_gpu)
            models["minilm"] = (target, "minilm-rand-1.0.0", artifact_sha256(target))
            info["minilm"]["sha256"] = models["minilm"][2]
        except Exception as exc:  # the tiny-bert parts still run
            info["minilm"] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
            print(f"MiniLM build failed: {exc}", file=sys.stderr, flush=True)
        for name, model in models.items():
            tiny = "tiny" if name == "sentiment" else name
            self.manifests[tiny] = sentiment_manifest(self.tmp / tiny, {"sentiment": model})
        self.manifests["inproc"] = sentiment_manifest(self.tmp / "inproc", models)
        return info

    def start_helper(self) -> dict[str, Any]:
        raw = self.tmp / "minilm-rand" if "minilm" in self.manifests else None
        timeout = max(30.0, min(180.0, self.left()))
        self.helper = Helper(
            self.manifests["inproc"],
            threads=CORES,
            logs=self.ctx.logs,
            raw_model=raw,
            timeout=timeout,
        )
        first = self.helper.first
        if bad := {k: v for k, v in first["models"].items() if v["status"] != "READY"}:
            raise RuntimeError(f"in-process models not READY: {bad}")
        if not self.cpu and not first["cuda_available"]:
            raise RuntimeError("torch.cuda.is_available() is False in the in-process helper")
        return first

    # -- workers ---------------------------------------------------------------------------
    @contextmanager
    def started(self, out: dict[str, Any], model: str, processes: int, **kw: Any) -> Iterator[Any]:
        """A worker of ``model`` (``concurrency`` = ``processes`` unless given): launched, READY
        (bounded wait; seconds in ``out["ready"]``), always stopped by PID."""
        env = {"MODEL_REPOSITORY": str(self.manifests[model]), **kw.pop("env", {})}
        worker = self.ctx.worker(concurrency=kw.pop("concurrency", processes), env=env, **kw)
        t_launch = time.time()
        worker.start()
        try:
            ready = ready_time(worker, processes, t_launch, max(20.0, min(150.0, self.left() - 10)))
            rec = {"launch_to_ready_s": round(ready["observed_s"], 3)}
            rec["launch_to_last_model_loaded_s"] = round(ready["last_loaded_s"], 3)
            out.setdefault("ready", []).append(rec)
            yield worker
        finally:
            worker.stop()

    def snapshots(self, worker: Any) -> list[dict[str, Any]]:
        return [s for s in worker.snapshots() if s.get("node") == worker.node]

    def process_check(self, worker: Any, expected: int) -> dict[str, Any]:
        """Devices from the snapshots; CUDA in the parent vs the pool processes."""
        import psutil

        gpu_pids, procs = gpu_compute_pids(), []
        for s in self.snapshots(worker):
            model = s["models"]["sentiment"]
            procs.append({"pid": s["pid"], "ready": s["ready"], "status": model["status"]})
            procs[-1].update(device=model["device"], **cuda_evidence(int(s["pid"]), gpu_pids))
        parent = {"pid": worker.pid, **cuda_evidence(worker.pid, gpu_pids)}
        # libcuda.so mapped by the imports alone (baseline) is not an initialised CUDA; an open
        # /dev/nvidia-uvm or a compute context listed by nvidia-smi is.
        libcuda_ok = parent["libcuda_mapped"] is False or bool(self.baseline.get("libcuda_mapped"))
        parent_ok = not parent["nvidia_uvm_open"] and not parent.get("in_nvidia_smi_compute_apps")
        parent_ok = parent_ok and libcuda_ok
        keys = ("libcuda_mapped", "nvidia_uvm_open", "in_nvidia_smi_compute_apps")
        children_cuda = [any(p.get(k) for k in keys) for p in procs]
        devices_ok = all(p["ready"] and p["device"] == self.device for p in procs)
        listed = any(p.get("in_nvidia_smi_compute_apps") for p in procs)
        return {
            "ok": len(procs) == expected
            and devices_ok
            and parent_ok
            and (self.cpu or all(children_cuda)),
            "expected_device": self.device,
            "parent_has_no_cuda": parent_ok,
            "children_use_cuda": children_cuda,
            "pool_processes": procs,
            "pool_children_of_parent": [c.pid for c in psutil.Process(worker.pid).children()],
            "parent": parent,
            "nvidia_smi_compute_apps": gpu_pids,
            "nvidia_smi_pids_match_this_pid_namespace": listed if gpu_pids is not None else None,
            "baseline_import_only": self.baseline,
        }

    def prefork(
        self,
        out: dict[str, Any],
        model: str,
        processes: int,
        sample: slice,
        *,
        timed: bool = True,
        env: dict[str, str] | None = None,
        then: Callable[[Any], None] | None = None,
    ) -> Any:
        """A prefork worker of ``model``: READY, devices, answers = in-process answers; with
        ``timed``, first task vs warm p50 and p50/p99 vs in-process; then ``then(worker)``."""
        env = {"TORCH_THREADS": str(max(1, CORES // processes)), **(env or {})}
        with self.started(out, model, processes, env=env) as worker:
            client = Client(worker)
            try:
                if timed:
                    out["first_job"] = self.first_and_warm(client)
                out["processes"] = self.process_check(worker, processes)
                out["correctness"] = self.correctness(client, model, texts()[sample])
                if timed:
                    out["latency"] = self.latency(worker, client, model)
                if then:
                    then(worker)
            finally:
                client.close()
        out["ok"] = bool(out["processes"]["ok"] and out["correctness"]["ok"])
        p, c, s = out["processes"], out["correctness"], out["summary"]
        devices = [x["device"] for x in p["pool_processes"]]
        ready = out["ready"][0]["launch_to_ready_s"]
        s["READY s / devices / parent CUDA-free / ok"] = (
            f"{ready:.2f} / {devices} / {p['parent_has_no_cuda']} / {out['ok']}"
        )
        diff = c.get("max_score_diff")
        s["answers = in-process (max |score diff|)"] = (
            f"{c['ok']} ({'-' if diff is None else f'{diff:.2e}'})"
        )
        if fj := out.get("first_job"):
            ratio = fj["ratio_first_to_warm_p50"]
            s["first task / warm p50 ms"] = (
                f"{fj['first_ms']:.2f} / {fj['warm']['p50_ms']:.2f} ({ratio:.2f}x)"
            )
        if (lt := out.get("latency") or {}).get("inproc"):
            a, b = lt["inproc"], lt["celery"]
            s["p50/p99 ms in-process vs Celery"] = (
                f"{a['p50_ms']:.2f}/{a['p99_ms']:.2f} vs {b['p50_ms']:.2f}/{b['p99_ms']:.2f} "
                f"({lt['p50_ratio']:.2f}x, +{lt['p50_diff_ms']:.2f} ms)"
            )
        return worker

    def first_and_warm(self, client: Client) -> dict[str, Any]:
        corpus = [([t], {}) for t in texts()]
        client.warm()  # the client's own connections first: the worker is measured
        first_ms, _ = client.call("sentiment.analyze", *corpus[0], timeout=60)
        warm = client.sequential("sentiment.analyze", corpus[1:], self.n(40, 8))
        return {
            "client_connected_before_first_task": True,
            "first_ms": round(first_ms, 3),
            "second_ms": round(warm[0], 3),
            "warm": stats(warm[1:]),
            "ratio_first_to_warm_p50": round(first_ms / med(warm[1:]), 3),
        }

    def correctness(self, client: Client, model: str, sample: list[str]) -> dict[str, Any]:
        if self.helper is None:
            return {"ok": False, "error": "no in-process helper (see meta.inproc)"}
        remote = [client.call("sentiment.analyze", [t], timeout=30)[1] for t in sample]
        local = self.helper.cmd("answers", texts=sample, model=INPROC[model])["answers"]
        diffs = [abs(float(c["score"]) - float(s)) for c, (_, s) in zip(remote, local, strict=True)]
        labels = all(c["label"] == label for c, (label, _) in zip(remote, local, strict=True))
        fallback = any(a.get("fallback") for a in remote)
        ok = bool(labels and diffs and max(diffs) <= SCORE_TOL and not fallback)
        return {
            "texts": len(local),
            "labels_equal": labels,
            "max_score_diff": max(diffs, default=None),
            "ok": ok,
        } | {
            "fallback_used": fallback,
            "celery_sample": remote[:2],
            "inproc_sample": local[:2],
        }

    def latency(self, worker: Any, client: Client, model: str) -> dict[str, Any]:
        """Alternating rounds: n in-process calls, n Celery calls (one in flight)."""
        if self.helper is None:
            return {"error": "no in-process helper (see meta.inproc)"}
        rec: dict[str, Any] = {}
        for _ in range(self.n(4, 2)):
            n = self.n(50, 10)
            one_round(self.ctx, self.helper, client, worker, "sentiment", n, rec, INPROC[model])
        local, remote, runtimes = rec["inproc_ms"], rec["celery_ms"], rec["runtime_ms"]
        return {
            "inproc": stats(local),
            "celery": stats(remote),
            "p50_ratio": round(med(remote) / med(local), 3),
            "p50_diff_ms": round(med(remote) - med(local), 3),
            "median_round_ratio": round(med(rec["round_ratios"]), 3),
            "worker_task_runtime_p50_ms": round(med(runtimes), 3) if runtimes else None,
        }

    def runs(
        self,
        driver: Driver,
        task: str,
        jobs: list[list[Any]],
        total: int,
        inflight: int,
        per_task: int = 1,
        *,
        client: Client | None = None,
        timeout: float = 60,
        drivers: int | None = None,
    ) -> dict[str, Any]:
        """``n(2, 1)`` measured driver runs: texts/s of each (and, with the worker's ``client``,
        its micro-batches), and their median."""
        runs = []
        for _ in range(self.n(2, 1)):
            before = self.batcher(client)
            with self.ctx.block():
                res = driver.run(task, jobs, total, inflight, drivers=drivers, timeout=timeout)
            res["texts_per_s"] = round(total * per_task / res["seconds"], 1)
            if client:
                after = self.batcher(client)
                batches = after.get("batches", 0) - before.get("batches", 0)
                items = after.get("items", 0) - before.get("items", 0)
                res["mean_micro_batch"] = round(items / batches, 2) if batches else None
                res["largest_micro_batch_so_far"] = after.get("largest")
            runs.append(res)
        return {"runs": runs, "texts_per_s_median": round(med([r["texts_per_s"] for r in runs]), 1)}

    def points(
        self, out: dict[str, Any], driver: Driver, pairs: Any, client: Client | None = None
    ) -> None:
        """Measured runs of single-text tasks at each (in flight, total) of ``pairs``, each with
        its printed row (and its ratio to the raw pipeline at batch 256), written at once."""
        raw = self.sections.get("raw_inprocess", {}).get("batch_256", {}).get("best_texts_per_s")
        for inflight, total in pairs:
            rec = self.runs(driver, "sentiment.analyze", SINGLE, total, inflight, client=client)
            out[f"inflight_{inflight}"], tps = rec, rec["texts_per_s_median"]
            mb = max((r.get("mean_micro_batch") or 0 for r in rec["runs"]), default=0)
            row = f"{tps:.0f}, {mb or '-'}, {rec['runs'][-1]['p50_ms']:.2f}"
            out["summary"][f"inflight {inflight}: texts/s, mean micro-batch, p50 ms"] = row
            if raw and client:
                out["summary"][f"inflight {inflight} / raw batch 256"] = f"{tps / raw:.2f}x"
            self.runner.write()

    def batcher(self, client: Client | None) -> dict[str, int]:
        """The worker's micro-batcher counters, from the state its process publishes."""
        if client is None:
            return {}
        snap = client.call("control.publish_state", [], timeout=30)[1]
        return dict((snap.get("stats") or {}).get("sentiment_batching") or {})

    # -- parts -----------------------------------------------------------------------------
    def part_imports(self, out: dict[str, Any]) -> None:
        names = FORBIDDEN + ALSO_REPORTED
        code = "import json, sys, workers.app\n"
        code += f"print(json.dumps([n for n in {names} if n in sys.modules]))"
        found = sorted(self.python(["-c", code], 60))
        try:
            self.baseline = self.python(["-c", BASELINE], 90)
        except RuntimeError as exc:
            self.baseline = {"error": str(exc)[-2000:]}
        forbidden = [n for n in found if n in FORBIDDEN]
        out.update(import_workers_app_imports=found, forbidden_imported=forbidden, ok=not forbidden)
        out["import_torch_transformers_baseline"] = self.baseline
        out["summary"]["imports of workers.app (forbidden)"] = str(forbidden)

    def part_tiny_c1(self, out: dict[str, Any]) -> None:
        out.update(worker="prefork -c 1", model="tiny-bert 1.0.0")
        self.prefork(out, "tiny", 1, slice(0, 8))

    def part_tiny_c2(self, out: dict[str, Any]) -> None:
        out.update(worker="prefork -c 2", model="tiny-bert 1.0.0")
        out["note"] = "PYTHONPROFILEIMPORTTIME=1 (import check): its launch to READY includes it"
        env = {"PYTHONPROFILEIMPORTTIME": "1"}
        log = self.prefork(out, "tiny", 2, slice(8, 16), timed=False, env=env).log()
        chains = import_chains(log, FORBIDDEN + ALSO_REPORTED)
        forbidden = sorted(n for n in chains if n in FORBIDDEN)
        out["worker_start_imports"] = {"profiled": "import time:" in log, "found": chains}
        out["worker_start_imports"]["forbidden_imported"] = forbidden
        out["ok"] = out["ok"] and not forbidden
        out["summary"]["worker start imports (forbidden)"] = str(forbidden)

    def part_minilm_prefork(self, out: dict[str, Any]) -> None:
        out.update(worker="prefork -c 1", model="MiniLM-L6 (random weights)", throughput={})
        corpus, tp = texts(), out["throughput"]

        def throughput(worker: Any) -> None:
            with Driver(worker, self.ctx.logs, self.k) as driver:
                driver.run("sentiment.analyze", SINGLE, self.n(64, 8), self.n(8, 4), timeout=60)
                tp["single_text"] = self.runs(
                    driver, "sentiment.analyze", SINGLE, self.n(512, 32), self.n(8, 4)
                )
                for size, tasks in ((32, self.n(32, 2)), (256, self.n(8, 1))):
                    jobs = [
                        [(corpus * (size // len(corpus) + 1))[i : i + size]]
                        for i in range(0, len(corpus), size)
                    ]
                    driver.run("sentiment.analyze_batch", jobs, 2, 2, timeout=120)  # warm
                    tp[f"analyze_batch_{size}"] = self.runs(
                        driver, "sentiment.analyze_batch", jobs, tasks, 2, size, timeout=180
                    )

        self.prefork(out, "minilm", 1, slice(0, 8), then=throughput)
        for key, rec in tp.items():
            out["summary"][f"{key} texts/s (best)"] = (
                f"{max(r['texts_per_s'] for r in rec['runs']):.0f}"
            )

    def part_raw(self, out: dict[str, Any]) -> None:
        if self.helper is None:
            raise RuntimeError("no in-process helper (see meta.inproc)")
        out["pipeline"] = "tokenizer + forward + softmax + copy to host, in-process, MiniLM"
        for batch, count in ((1, self.n(256, 16)), (32, self.n(512, 64)), (256, self.n(1024, 256))):
            sample = (texts() * (count // len(texts()) + 1))[:count]
            args = {"texts": sample, "batch": batch, "rounds": self.n(3, 1), "tokenizer": True}
            res = self.helper.cmd("raw_throughput", timeout=max(60.0, self.left()), **args)
            best, tok = max(res["rates"]), res["tokenizer_only_texts_per_s"]
            rates = [round(r, 1) for r in res["rates"]]
            out[f"batch_{batch}"] = {
                "texts": count,
                "texts_per_s": rates,
                "best_texts_per_s": round(best, 1),
            }
            out[f"batch_{batch}"]["tokenizer_only_texts_per_s"] = round(tok, 1)
            out["summary"][f"MiniLM batch {batch} texts/s (tokenizer only)"] = (
                f"{best:.0f} ({tok:.0f})"
            )
        prefork = self.sections.get("minilm_prefork_c1", {}).get("throughput", {})
        if "analyze_batch_256" in prefork:
            best = max(r["texts_per_s"] for r in prefork["analyze_batch_256"]["runs"])
            ratio = best / out["batch_256"]["best_texts_per_s"]
            out["summary"]["analyze_batch 256 (prefork -c1) / raw batch 256"] = f"{ratio:.2f}x"

    def part_threads(self, out: dict[str, Any]) -> None:
        out.update(worker="threads -c 256, BATCH_MAX_SIZE=256, BATCH_WINDOW_MS=2", drivers=self.k)
        out["model"] = "MiniLM-L6 (random weights)"
        s = out["summary"]
        with ExitStack() as stack:
            worker = stack.enter_context(
                self.started(out, "minilm", 1, concurrency=256, pool="threads", env=THREADS_ENV)
            )
            client = Client(worker)
            stack.callback(client.close)
            driver = stack.enter_context(Driver(worker, self.ctx.logs, self.k))
            out["device"] = [x["models"]["sentiment"]["device"] for x in self.snapshots(worker)]
            lone = client.sequential(
                "sentiment.analyze", [([t], {}) for t in texts()], self.n(30, 6)
            )
            out["lone_request"] = stats(lone[3:])
            s["lone request p50 ms"] = f"{out['lone_request']['p50_ms']:.2f}"
            driver.run("sentiment.analyze", SINGLE, self.n(256, 16), 64, timeout=60)  # warm
            pairs = ((self.n(64, 8), self.n(2048, 64)), (self.n(256, 32), self.n(4096, 128)))
            self.points(out, driver, pairs, client)

    def part_ceiling(self, out: dict[str, Any]) -> None:
        """The same threads pool and Celery config, a task without a model (bench.noop): what
        the client + Celery + Redis path carries on this machine."""
        out["worker"] = "threads -c 256, celery -A bench.exp_app (product app + bench.noop)"
        out["task"] = "bench.noop: returns its argument, no model"
        env = {"MODEL_DEVICE": "cpu"}
        kw = {"concurrency": 256, "pool": "threads", "env": env, "app": "bench.exp_app"}
        with (
            self.started(out, "tiny", 1, **kw) as worker,
            Driver(worker, self.ctx.logs, self.k) as driver,
        ):
            out["inflight"] = inflight = self.n(256, 32)
            driver.run("bench.noop", SINGLE, self.n(256, 16), inflight, timeout=60)  # warm
            for k in sorted({self.k, 1}, reverse=True):
                rec = out[f"drivers_{k}"] = self.runs(
                    driver, "bench.noop", SINGLE, self.n(4096, 128), inflight, drivers=k
                )
                out["summary"][f"bench.noop tasks/s, drivers {k}"] = (
                    f"{rec['texts_per_s_median']:.0f}"
                )

    def part_threads_x4(self, out: dict[str, Any]) -> None:
        """Four threads-pool workers (four nodes, one queue) sharing the one device, each
        micro-batching its own tasks: single-text throughput when one process's Celery consumer
        is the limit."""
        out["workers"] = "4 x threads -c 128, BATCH_MAX_SIZE=256, BATCH_WINDOW_MS=2, one queue"
        out.update(model="MiniLM-L6 (random weights)", drivers=self.k * 2)
        prefix = f"gpux4-{uuid.uuid4().hex[:6]}"
        kw = {"concurrency": 128, "pool": "threads", "env": THREADS_ENV, "prefix": prefix}
        with ExitStack() as stack:
            workers = [
                stack.enter_context(self.started(out, "minilm", 1, node=f"{prefix}-{i}@gpu", **kw))
                for i in range(4)
            ]
            driver = stack.enter_context(Driver(workers[0], self.ctx.logs, self.k * 2))
            driver.run("sentiment.analyze", SINGLE, self.n(512, 16), 256, timeout=60)  # warm
            pairs = ((self.n(256, 16), self.n(4096, 64)), (self.n(1024, 32), self.n(8192, 128)))
            self.points(out, driver, pairs)
            stats_ = [
                (s.get("stats") or {}).get("sentiment_batching")
                for w in workers
                for s in self.snapshots(w)
            ]
        out["batcher_stats_per_worker"] = stats_
        items, batches = (sum(b[k] for b in stats_ if b) for k in ("items", "batches"))
        out["summary"]["mean micro-batch (all runs)"] = f"{items / batches:.2f}" if batches else "-"

    def pack_logs(self) -> None:
        """Worker, in-process and driver logs next to --out (each cut to its last 4 MiB)."""
        target = self.runner.out.with_name(self.runner.out.stem + "-logs.tar.gz")
        with suppress(Exception), tarfile.open(target, "w:gz") as tar:
            for path in sorted(self.ctx.logs.iterdir()):
                data = path.read_bytes()[-(4 << 20) :]
                info = tarfile.TarInfo(path.name)
                info.size, info.mtime = len(data), int(time.time())
                tar.addfile(info, io.BytesIO(data))
            self.runner.results["meta"]["logs"] = target.name


PARTS = {  # name -> (method, seconds of budget it needs to start)
    "imports": ("part_imports", 10),
    "tiny_prefork_c1": ("part_tiny_c1", 30),
    "tiny_prefork_c2": ("part_tiny_c2", 30),
    "minilm_prefork_c1": ("part_minilm_prefork", 40),
    "raw_inprocess": ("part_raw", 15),
    "threads_pool": ("part_threads", 35),
    "client_ceiling": ("part_ceiling", 25),
    "threads_pool_x4": ("part_threads_x4", 40),
}


def main(argv: list[str] | None = None) -> int:
    from workers.embedded import EmbeddedRedis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--cpu-check", action="store_true", help="MODEL_DEVICE=cpu, tiny counts")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts")
    parser.add_argument("--drivers", type=int, default=0, help="driver processes (0: 4, cpu 2)")
    parser.add_argument("--only", default="", help=f"comma-separated parts of: {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := [x for x in args.only if x not in PARTS]:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.budget is None:
        args.budget = 600.0 if args.cpu_check else 200.0
    device = "cpu" if args.cpu_check else "cuda"
    os.environ.update(MODEL_DEVICE=device, TOKENIZERS_PARALLELISM="false")  # every process
    meta = {"mode": "cpu-check" if args.cpu_check else "gpu", "model_device": device}
    runner = Runner(Path(args.out), "bench.gpu", sys.argv[1:] if argv is None else argv, **meta)
    ctx = Ctx(redis_url="", logs=runner.logs, quick=True, gate_s=3.0 if args.cpu_check else 6.0)
    run, meta = GpuRun(args, ctx, runner), runner.results["meta"]
    meta.update(driver_processes=run.k, budget_s=args.budget)
    complete = False
    try:
        with EmbeddedRedis() as redis_server:
            ctx.redis_url = redis_server.url
            meta["models"] = run.build_models()
            try:
                meta["inproc"] = run.start_helper()
            except Exception as exc:  # the worker-side checks still run
                meta["inproc"] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                if run.helper is not None:
                    run.helper.close()
                    run.helper = None
            for key in ("torch", "torch_cuda", "transformers", "gpu_name", "cuda_available"):
                meta[key] = meta["inproc"].get(key)
            runner.write()
            for name, (method, need_s) in PARTS.items():
                run.part(name, getattr(run, method), need_s)
            complete = True
    except Exception:
        meta["setup_error"] = traceback.format_exc()[-4000:]
        print(meta["setup_error"], file=sys.stderr, flush=True)
    finally:
        if run.helper is not None:
            run.helper.close()
        run.pack_logs()
        shutil.rmtree(run.tmp, ignore_errors=True)
        print(f"device {device} / {meta.get('gpu_name')}")
        failed = runner.finish(complete)
    if failed:
        print(f"\nparts failed or not ok: {failed}", flush=True)
    return 1 if (failed or not complete) else 0


if __name__ == "__main__":
    raise SystemExit(main())
