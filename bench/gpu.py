"""One-shot GPU benchmark: ``python -m bench.gpu --out OUT/gpu.json [--cpu-check] [--budget S]``.

Real Redis (``workers.embedded.EmbeddedRedis``), real ``celery worker`` processes, the product's
loader (sha256-checked manifests), ``MODEL_DEVICE=cuda`` (``--cpu-check``: ``cpu``, tiny counts,
for a smoke test on a CPU-only machine). Parts, each written to ``--out`` as soon as it ends:

a. GPU path correctness: prefork ``-c 1`` and ``-c 2`` workers start, every pool process is READY
   with its model on ``cuda`` (process snapshots), the worker's main process has not initialised
   CUDA (no ``libcuda.so`` in ``/proc/PID/maps``; ``nvidia-smi --query-compute-apps``), Celery's
   answers equal the in-process GPU answers (label; score within 1e-3), and no forecasting /
   TextBlob library is imported by ``import workers.app`` or by a worker start.
b. launch -> all READY, first task after READY vs warm p50 (tiny-bert, MiniLM).
c. ``sentiment.analyze`` p50/p99 through Celery vs the same registry model in-process.
d. MiniLM throughput: raw in-process batched forward (batch 1/32/256), threads pool (micro-
   batching) at 64/256 in flight, prefork -c 1, analyze_batch 32/256; and the client ceiling
   (a no-model task on the same pool, same Celery config, same drivers).

The MiniLM classifier is built on the spot with random weights from
``bench/.cache/minilm-gpu-src`` (config + tokenizer of the bench suite's MiniLM-L6 classifier): the
same architecture and shapes, so the same time per forward pass as trained weights.

The same file is also: the in-process side (``--inproc``), a load-driver process (``--drive``),
the MiniLM builder (``--build-minilm``) and a Celery app with one extra no-model task
(``celery -A bench.gpu:noop_app``, for the client ceiling only). Top-level imports are stdlib only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MINILM_SRC = ROOT / "bench" / ".cache" / "minilm-gpu-src"
REAL_MANIFEST = ROOT / "models" / "models.toml"
FORBIDDEN = ("prophet", "textblob", "nltk", "cmdstanpy")
ALSO_REPORTED = ("statsmodels", "sklearn", "flower", "tornado", "matplotlib")
SCORE_TOL = 1e-3
PARTS = [
    "imports",
    "tiny_prefork_c1",
    "tiny_prefork_c2",
    "minilm_prefork_c1",
    "raw_inprocess",
    "threads_pool",
    "client_ceiling",
    "threads_pool_x4",
]


# ---- shared by every child mode --------------------------------------------------------------
def _json_stdout() -> Any:
    """A private copy of stdout for JSON lines; fd 1 then points at stderr, so that whatever a
    library prints lands in the log instead of the protocol."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


def _emit(out: Any, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, default=str) + "\n")
    out.flush()


def _stats(ms: list[float]) -> dict[str, Any]:
    from bench.common import med, pct

    return {"n": len(ms), "p50_ms": round(med(ms), 3), "p99_ms": round(pct(ms, 99), 3)}


# ---- --build-minilm SRC DST: random-weight MiniLM classifier -----------------------------------
def build_minilm_main(src: str, dst: str) -> int:
    out = _json_stdout()
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    tokenizer = AutoTokenizer.from_pretrained(src)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    params = sum(p.numel() for p in model.parameters())
    _emit(out, {"ok": True, "parameters": params, "files": sorted(os.listdir(dst))})
    return 0


# ---- --inproc: the in-process side (no Celery, no Redis) ----------------------------------------
class InProc:
    """Both registries (tiny-bert, MiniLM) loaded by the product's ModelRegistry on
    MODEL_DEVICE, and the raw tokenizer + forward pipeline of bench/helper.py on that device."""

    def __init__(self, registries: dict[str, Any], raw_model: str, device: str) -> None:
        self.registries = registries
        self.raw_model = raw_model
        self.device = device
        self._raw: tuple[Any, Any] | None = None

    def model(self, name: str) -> Any:
        return self.registries[name].get("sentiment")

    def latency(self, name: str, texts: list[str], n: int) -> list[float]:
        model, out = self.model(name), []
        for i in range(n):
            t0 = time.perf_counter()
            model.classify([texts[i % len(texts)]])  # .tolist() inside: synchronised
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def classify(self, name: str, texts: list[str]) -> list[list[Any]]:
        model = self.model(name)
        return [list(model.classify([t])[0]) for t in texts]  # one text per call, as a task

    def raw(self) -> tuple[Any, Any]:
        if not self.raw_model:
            raise RuntimeError("no MiniLM directory (its build failed)")
        if self._raw is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.raw_model)
            model = AutoModelForSequenceClassification.from_pretrained(self.raw_model).eval()
            if self.device != "cpu":
                model.to(self.device)
            self._raw = (tok, model)
        return self._raw

    def _batch(self, tok: Any, model: Any, texts: list[str]) -> None:
        import torch

        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        if self.device != "cpu":
            enc = {k: v.to(self.device) for k, v in enc.items()}
        probs = torch.softmax(model(**enc).logits.float(), dim=-1)
        scores, idx = probs.max(dim=-1)
        idx.tolist(), scores.tolist()  # to the host, as the product does: synchronised

    def raw_throughput(self, texts: list[str], batch: int, rounds: int) -> dict[str, Any]:
        """texts/s of tokenizer + forward + softmax (+ copy back) in batches of ``batch``."""
        import torch

        tok, model = self.raw()
        with torch.inference_mode():
            self._batch(tok, model, texts[:batch])  # warm this shape
            rates = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for i in range(0, len(texts), batch):
                    self._batch(tok, model, texts[i : i + batch])
                rates.append(len(texts) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for i in range(0, len(texts), batch):
            tok(
                texts[i : i + batch],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
        tokenize_rate = len(texts) / (time.perf_counter() - t0)
        return {"rates": rates, "tokenizer_only_texts_per_s": tokenize_rate}

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd["cmd"]
        if kind == "latency":
            return {"ms": self.latency(cmd["model"], cmd["texts"], int(cmd["n"]))}
        if kind == "classify":
            return {"answers": self.classify(cmd["model"], cmd["texts"])}
        if kind == "raw":
            return self.raw_throughput(cmd["texts"], int(cmd["batch"]), int(cmd["rounds"]))
        raise ValueError(kind)


def inproc_main(args: argparse.Namespace) -> int:
    out = _json_stdout()
    t_start = time.time()
    from shared.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    from shared.families.transformers_sentiment import resolve_device
    from shared.manifest import load_manifest
    from shared.registry import ModelRegistry

    registries: dict[str, Any] = {}
    models: dict[str, Any] = {}
    for name, path in (("tiny", args.tiny), ("minilm", args.minilm)):
        if not path:
            continue
        manifest = load_manifest(Path(path), default_version=settings.model_version)
        registry = ModelRegistry(
            device=settings.model_device,
            load_timeout=settings.load_timeout_seconds,
            loader_threads=1,
            warmup=True,
        )
        registry.load_all(manifest.active())
        registries[name] = registry
        meta = registry.snapshot()["models"]["sentiment"]
        models[name] = {k: meta.get(k) for k in ("status", "device", "error", "load_seconds")}
    cuda = bool(torch.cuda.is_available())
    _emit(
        out,
        {
            "ok": True,
            "event": "ready",
            "pid": os.getpid(),
            "seconds": round(time.time() - t_start, 2),
            "models": models,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "cuda_available": cuda,
            "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
            "torch_threads": torch.get_num_threads(),
            "model_device_setting": settings.model_device,
        },
    )
    server = InProc(registries, args.raw_model, resolve_device(settings.model_device))
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            _emit(out, {"ok": True})
            break
        try:
            _emit(out, {"ok": True, **server.handle(cmd)})
        except Exception as exc:
            _emit(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


# ---- --drive REDIS_URL QUEUE: one load-driver process ----------------------------------------
def _drive_run(app: Any, pubsub: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """Keep ``inflight`` of ``total`` tasks in flight (args cycling through ``jobs``)."""
    import uuid

    jobs, total, inflight = cmd["jobs"], int(cmd["total"]), int(cmd["inflight"])
    timeout = float(cmd.get("timeout", 60))
    prefix = len(b"celery-task-meta-")
    sent: dict[str, float] = {}
    latencies: list[float] = []
    failures: list[str] = []
    next_i = 0
    producer = app.producer_pool.acquire(block=True)
    try:

        def send() -> None:
            nonlocal next_i
            task_id = uuid.uuid4().hex
            sent[task_id] = time.perf_counter()
            app.send_task(
                cmd["task"], args=jobs[next_i % len(jobs)], task_id=task_id, producer=producer
            )
            next_i += 1

        while time.time() < float(cmd.get("start_at", 0)):
            time.sleep(0.002)
        t_start = time.time()
        for _ in range(min(inflight, total)):
            send()
        stop = time.monotonic() + timeout
        done = 0
        while done < total:
            if time.monotonic() > stop:
                raise TimeoutError(f"{done}/{total} results after {timeout} s")
            msg = pubsub.get_message(timeout=1.0)
            if not msg or msg.get("type") != "pmessage":
                continue
            task_id = msg["channel"][prefix:].decode()
            if task_id not in sent:  # another driver's task
                continue
            body = json.loads(msg["data"])
            status = body.get("status")
            if status not in ("SUCCESS", "FAILURE"):
                continue
            latencies.append((time.perf_counter() - sent.pop(task_id)) * 1000)
            if status == "FAILURE":
                failures.append(str(body.get("result"))[:200])
            done += 1
            if next_i < total:
                send()
        t_end = time.time()
    finally:
        producer.release()
    return {
        "ok": True,
        "t_start": t_start,
        "t_end": t_end,
        "tasks": total,
        "latencies": [round(x, 3) for x in latencies],
        "failures": failures[:20],
        "failed": len(failures),
    }


def drive_main(redis_url: str, queue: str) -> int:
    """bench.common.Driver's loop in a process of its own (several run side by side): Celery
    publishes, one pattern subscription to celery-task-meta-* receives the results; messages of
    other drivers' tasks are skipped by channel name, without decoding."""
    out = _json_stdout()
    import redis
    from celery import Celery

    app = Celery(broker=redis_url)
    app.conf.update(task_default_queue=queue, task_serializer="json", accept_content=["json"])
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=False)
    pubsub.psubscribe("celery-task-meta-*")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.5)
        if msg and msg.get("type") == "psubscribe":
            break
    else:
        _emit(out, {"ok": False, "error": "no psubscribe confirmation"})
        return 1
    _emit(out, {"ok": True, "event": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            _emit(out, {"ok": True})
            break
        try:
            _emit(out, _drive_run(app, pubsub, cmd))
        except Exception as exc:
            _emit(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    with suppress(Exception):
        pubsub.close()
    with suppress(Exception):
        app.close()
    return 0


# ---- celery -A bench.gpu:noop_app: the product app plus one task without a model ----------------
_NOOP_APP: Any = None


def _noop_app() -> Any:
    global _NOOP_APP
    if _NOOP_APP is None:
        from shared import schemas
        from tasks.base import limits
        from workers.app import app

        @app.task(name="bench.noop")  # type: ignore[untyped-decorator]
        def noop(text: Any) -> dict[str, Any]:
            """sentiment.analyze's validation and answer shape, no model: the Celery ceiling."""
            schemas.sentiment_text(text, limits())
            return {
                "label": "neutral",
                "score": 1.0,
                "model": "noop",
                "version": "0",
                "fallback": False,
            }

        _NOOP_APP = app
    return _NOOP_APP


def __getattr__(name: str) -> Any:  # PEP 562: the app is built only when celery asks for it
    if name == "noop_app":
        return _noop_app()
    raise AttributeError(name)


# ---- the orchestrator's helpers ---------------------------------------------------------------
class JsonProc:
    """A child process speaking JSON lines (stdin -> stdout); every read has a deadline."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._buf = b""
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _died(self) -> RuntimeError:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        return RuntimeError(f"{self.name} exited ({self.proc.poll()}):\n{tail}")

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise self._died()
                self._buf += chunk
            elif self.proc.poll() is not None:
                raise self._died()
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, timeout: float = 120, **obj: Any) -> dict[str, Any]:
        self.send(obj)
        out = self.read(timeout)
        if not out.get("ok"):
            raise RuntimeError(f"{self.name} {obj.get('cmd')} failed: {out.get('error')}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(Exception):
                self.send({"cmd": "quit"})
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.proc.poll() is None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        self._log.close()


class Drivers:
    """K driver processes (``--drive``) sharing one run: ``inflight`` and ``total`` are split
    among them, they start together at a wall-clock instant, and the run lasts from the first
    send to the last answer of any of them."""

    def __init__(self, redis_url: str, queue: str, k: int, logs: Path, env: dict[str, str]):
        self.procs: list[JsonProc] = []
        try:
            for i in range(k):
                self.procs.append(
                    JsonProc(
                        f"driver-{queue}-{i}",
                        [sys.executable, "-m", "bench.gpu", "--drive", redis_url, queue],
                        env,
                        logs,
                    )
                )
            for p in self.procs:
                p.read(60)
        except BaseException:
            self.close()
            raise

    def run(
        self,
        task: str,
        jobs: list[list[Any]],
        total: int,
        inflight: int,
        *,
        drivers: int | None = None,
        timeout: float = 60,
    ) -> dict[str, Any]:
        from bench.common import med, pct

        k = max(1, min(drivers or len(self.procs), len(self.procs), inflight, total))
        active = self.procs[:k]
        start_at = time.time() + 0.2
        for i, p in enumerate(active):
            share_total = total // k + (1 if i < total % k else 0)
            share_inflight = inflight // k + (1 if i < inflight % k else 0)
            p.send(
                {
                    "cmd": "run",
                    "task": task,
                    "jobs": jobs[i::k] or jobs,
                    "total": share_total,
                    "inflight": share_inflight,
                    "start_at": start_at,
                    "timeout": timeout,
                }
            )
        answers = [p.read(timeout + 15) for p in active]
        bad = [a.get("error") for a in answers if not a.get("ok")]
        if bad:
            raise RuntimeError(f"driver failed: {bad}")
        lat = [x for a in answers for x in a["latencies"]]
        seconds = max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers)
        return {
            "seconds": round(seconds, 4),
            "tasks": total,
            "tasks_per_s": round(total / seconds, 1),
            "inflight": inflight,
            "drivers": k,
            "failed": sum(a["failed"] for a in answers),
            "failures": [f for a in answers for f in a["failures"]][:5],
            "p50_ms": round(med(lat), 3),
            "p99_ms": round(pct(lat, 99), 3),
            "per_driver_s": [round(a["t_end"] - a["t_start"], 3) for a in answers],
        }

    def close(self) -> None:
        for p in self.procs:
            p.close()


def maps_have(pid: int, needle: str) -> bool | None:
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text(errors="replace")
    except OSError:
        return None


def nvidia_fds(pid: int) -> list[str] | None:
    """The /dev/nvidia* files a process holds open (cuInit opens nvidiactl and nvidia-uvm)."""
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/nvidia"):
                    out.append(target)
    except OSError:
        return None
    return sorted(set(out))


def cuda_evidence(pid: int, gpu_pids: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "libcuda_mapped": maps_have(pid, "libcuda.so"),
        "nvidia_uvm_open": (
            None if (fds := nvidia_fds(pid)) is None else any("uvm" in f for f in fds)
        ),
        "dev_nvidia_fds": fds,
        "in_nvidia_smi_compute_apps": (
            None if gpu_pids is None else any(r["pid"] == pid for r in gpu_pids)
        ),
    }


# run in a fresh interpreter: what importing the ML libraries alone maps (the parent's baseline)
BASELINE = """
import json, os, sys
import torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
maps = open("/proc/self/maps").read()
fds = []
for fd in os.listdir("/proc/self/fd"):
    try:
        t = os.readlink("/proc/self/fd/" + fd)
    except OSError:
        continue
    if t.startswith("/dev/nvidia"):
        fds.append(t)
print(json.dumps({"libcuda_mapped": "libcuda.so" in maps, "libtorch_cuda_mapped":
    "libtorch_cuda" in maps, "dev_nvidia_fds": sorted(set(fds)),
    "cuda_initialized": torch.cuda.is_initialized()}))
"""


def gpu_compute_pids() -> list[dict[str, Any]] | None:
    try:
        res = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    rows = []
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        with suppress(ValueError, IndexError):
            rows.append({"pid": int(parts[0]), "used_mib": parts[1]})
    return rows


def import_chains(log_text: str, names: tuple[str, ...]) -> dict[str, list[str]]:
    """From ``PYTHONPROFILEIMPORTTIME`` output: for each package of ``names`` that was imported,
    the chain 'outermost import -> ... -> package' (a module's line comes after the lines of
    what it imported, one indentation level deeper; a lazy import inside a function shows up as
    an outermost import)."""
    rows: list[tuple[int, str]] = []
    for line in log_text.splitlines():
        if not line.startswith("import time:") or line.count("|") < 2:
            continue
        field = line.split("|", 2)[2].rstrip()
        name = field.strip()
        if name and name != "imported package":
            rows.append((len(field) - len(field.lstrip()), name))
    found: dict[str, list[str]] = {}
    for i, (indent, name) in enumerate(rows):
        if name not in names or name in found:
            continue
        chain, level = [name], indent
        for later_indent, later in rows[i + 1 :]:
            if later_indent < level:
                chain.append(later)
                level = later_indent
        found[name] = list(reversed(chain))
    return found


def compare_answers(celery_answers: list[dict[str, Any]], local: list[list[Any]]) -> dict[str, Any]:
    diffs = [
        abs(float(c["score"]) - float(score))
        for c, (_, score) in zip(celery_answers, local, strict=False)
    ]
    labels = [c["label"] == label for c, (label, _) in zip(celery_answers, local, strict=False)]
    return {
        "texts": len(local),
        "labels_equal": all(labels) and len(celery_answers) == len(local),
        "max_score_diff": max(diffs) if diffs else None,
        "ok": bool(all(labels) and diffs and max(diffs) <= SCORE_TOL),
        "celery_sample": celery_answers[:2],
        "inproc_sample": local[:2],
    }


def write_manifest_for(folder: Path, target: Path, version: str, sha256: str) -> Path:
    """A sentiment-only manifest (no TextBlob fallback, nothing else), artifact under
    ``folder/sentiment`` (a symlink when ``target`` lies elsewhere)."""
    from harness import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "sentiment"
    if target.resolve() != link.resolve() or not link.exists():
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    entry = {
        "name": "sentiment",
        "family": "transformers",
        "path": "sentiment",
        "version": version,
        "sha256": sha256,
        "required": True,
        "lazy": False,
        "fallback": "",
        "options": {"max_length": 128},
    }
    return write_manifest(folder, [entry])


# ---- the run -------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        from bench.common import CORES

        self.args = args
        self.cpu = args.cpu_check
        self.device = "cpu" if self.cpu else "cuda"
        self.deadline = time.monotonic() + args.budget
        self.out = Path(args.out).resolve()
        self.logs = Path(tempfile.mkdtemp(prefix="modelworkers-gpu-bench-"))
        self.tmp = Path(tempfile.mkdtemp(prefix="modelworkers-gpu-models-"))
        self.cores = CORES
        self.k = args.drivers or (2 if self.cpu else 4)
        self.results: dict[str, Any] = {"meta": {}, "parts": {}, "errors": {}}
        self.ctx: Any = None
        self.helper: JsonProc | None = None
        self.baseline: dict[str, Any] | None = None

    # -- sizes: (GPU, --cpu-check) ---------------------------------------------------------------
    def n(self, gpu: int, cpu: int) -> int:
        return cpu if self.cpu else gpu

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        tmp.replace(self.out)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        from bench.common import clean_env

        return clean_env(
            {"MODEL_DEVICE": self.device, "TOKENIZERS_PARALLELISM": "false", **(extra or {})}
        )

    def part(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float) -> None:
        """Run one part; its result (or error) goes to --out at once."""
        if self.args.only and name not in self.args.only:
            return
        if self.left() < need_s:
            self.results["parts"][name] = {"skipped": f"{self.left():.0f} s of budget left"}
            print(f"--- {name}: skipped (budget)", flush=True)
            self.write()
            return
        print(f"--- {name} ...", flush=True)
        t0 = time.monotonic()
        self.ctx.new_section()
        self.ctx.gate_budget_s = 3.0 if self.cpu else 6.0
        entry: dict[str, Any]
        try:
            entry = fn()
        except Exception as exc:
            entry = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
            self.results["errors"][name] = traceback.format_exc()[-4000:]
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
        except BaseException:  # SIGTERM / Ctrl-C: keep what this part had, then unwind
            previous = self.results["parts"].get(name, {})
            self.results["parts"][name] = {
                **previous,
                "error": "interrupted (SIGTERM or Ctrl-C) during this part",
                "seconds": round(time.monotonic() - t0, 1),
            }
            self.write()
            raise
        entry["seconds"] = round(time.monotonic() - t0, 1)
        self.results["parts"][name] = entry
        print(f"--- {name} done in {entry['seconds']:.0f} s", flush=True)
        self.write()

    # -- workers ---------------------------------------------------------------------------------
    def worker(
        self,
        manifest: Path,
        *,
        concurrency: int,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        app: str | None = None,
        prefix: str | None = None,
        node: str | None = None,
    ) -> Any:
        worker = self.ctx.worker(
            concurrency=concurrency,
            pool=pool,
            env={"MODEL_DEVICE": self.device, "MODEL_MANIFEST": str(manifest), **(env or {})},
            prefix=prefix,
            node=node,
        )
        if app:
            worker.args[worker.args.index("workers.app")] = app
        return worker

    @contextmanager
    def started(self, worker: Any, processes: int) -> Iterator[dict[str, Any]]:
        """Launch, wait (bounded) until ``processes`` are READY, always stop by PID."""
        from bench.common import ready_time

        t_launch = time.time()
        worker.start()
        try:
            timeout = max(20.0, min(150.0, self.left() - 10))
            ready = ready_time(worker, processes, t_launch, timeout=timeout)
            yield {
                "launch_to_ready_s": round(ready["observed_s"], 3),
                "launch_to_last_model_loaded_s": round(ready["last_loaded_s"], 3),
            }
        finally:
            worker.stop()

    def snapshots(self, worker: Any) -> list[dict[str, Any]]:
        return [s for s in worker.snapshots() if s.get("node") == worker.node]

    def process_check(self, worker: Any, children_expected: int) -> dict[str, Any]:
        """Devices from the snapshots; CUDA in the parent vs the pool processes."""
        import psutil

        snaps = self.snapshots(worker)
        children = [c.pid for c in psutil.Process(worker.pid).children()]
        gpu_pids = gpu_compute_pids()
        procs = [
            {
                "pid": s["pid"],
                "ready": s["ready"],
                "status": s["models"]["sentiment"]["status"],
                "device": s["models"]["sentiment"]["device"],
                **cuda_evidence(int(s["pid"]), gpu_pids),
            }
            for s in snaps
        ]
        parent = {"pid": worker.pid, **cuda_evidence(worker.pid, gpu_pids)}
        parent["libtorch_cuda_mapped"] = maps_have(worker.pid, "libtorch_cuda")
        # libcuda.so mapped by the imports alone (baseline) is not an initialised CUDA; an open
        # /dev/nvidia-uvm or a compute context listed by nvidia-smi is.
        baseline = self.baseline or {}
        parent_ok = (
            not parent["nvidia_uvm_open"]
            and not parent["in_nvidia_smi_compute_apps"]
            and (parent["libcuda_mapped"] is False or bool(baseline.get("libcuda_mapped")))
        )
        children_cuda = [
            bool(p["libcuda_mapped"] or p["nvidia_uvm_open"] or p["in_nvidia_smi_compute_apps"])
            for p in procs
        ]
        want = self.device
        ok = (
            len(procs) == children_expected
            and all(p["ready"] and p["device"] == want for p in procs)
            and parent_ok
            and (self.cpu or all(children_cuda))
        )
        listed = gpu_pids is not None and any(p["in_nvidia_smi_compute_apps"] for p in procs)
        return {
            "ok": ok,
            "expected_device": want,
            "parent_has_no_cuda": parent_ok,
            "children_use_cuda": children_cuda,
            "pool_processes": procs,
            "pool_children_of_parent": children,
            "parent": parent,
            "nvidia_smi_compute_apps": gpu_pids,
            "nvidia_smi_pids_match_this_pid_namespace": listed if gpu_pids is not None else None,
            "baseline_import_only": baseline,
        }

    def seq(self, client: Any, texts: list[str], n: int, task: str = "sentiment.analyze") -> Any:
        ms, answers = [], []
        for i in range(n):
            t, value = client.call(task, [texts[i % len(texts)]], timeout=30)
            ms.append(t)
            answers.append(value)
        return ms, answers

    def first_and_warm(self, client: Any, texts: list[str]) -> dict[str, Any]:
        import uuid

        from bench.common import med, release

        # connect the client first (broker, result pub/sub): a task to a queue nobody reads
        probe = client.app.send_task("bench.unconsumed", queue=f"bench-probe-{uuid.uuid4().hex}")
        with suppress(Exception):
            probe.get(timeout=0.05)
        release(client.app, probe)
        first_ms, _ = client.call("sentiment.analyze", [texts[0]], timeout=60)
        warm, _ = self.seq(client, texts[1:], self.n(40, 8))
        return {
            "client_connected_before_first_task": True,
            "first_ms": round(first_ms, 3),
            "second_ms": round(warm[0], 3),
            "warm": _stats(warm[1:]),
            "ratio_first_to_warm_p50": round(first_ms / med(warm[1:]), 3),
        }

    def correctness(self, client: Any, model: str, texts: list[str]) -> dict[str, Any]:
        if self.helper is None:
            return {"ok": False, "error": "no in-process helper (see meta.inproc)"}
        _, celery_answers = self.seq(client, texts, len(texts))
        local = self.helper.cmd(cmd="classify", model=model, texts=texts)["answers"]
        out = compare_answers(celery_answers, local)
        out["fallback_used"] = any(a.get("fallback") for a in celery_answers)
        out["ok"] = out["ok"] and not out["fallback_used"]
        return out

    def latency(self, worker: Any, client: Any, model: str, texts: list[str]) -> dict[str, Any]:
        """Alternating rounds: n in-process calls, n Celery calls (one in flight)."""
        from bench.common import med, task_runtimes_ms

        if self.helper is None:
            return {"error": "no in-process helper (see meta.inproc)"}
        rounds, n = self.n(4, 2), self.n(50, 10)
        local: list[float] = []
        remote: list[float] = []
        ratios = []
        client.ids.clear()
        for _ in range(rounds):
            with self.ctx.block():
                a = self.helper.cmd(cmd="latency", model=model, texts=texts, n=n)["ms"]
            with self.ctx.block():
                b, _ = self.seq(client, texts, n)
            local += a
            remote += b
            ratios.append(med(b) / med(a))
        runtimes = task_runtimes_ms(worker, list(client.ids))
        return {
            "inproc": _stats(local),
            "celery": _stats(remote),
            "p50_ratio": round(med(remote) / med(local), 3),
            "p50_diff_ms": round(med(remote) - med(local), 3),
            "median_round_ratio": round(med(ratios), 3),
            "worker_task_runtime_p50_ms": round(med(runtimes), 3) if runtimes else None,
        }

    # -- parts -----------------------------------------------------------------------------------
    def part_imports(self) -> dict[str, Any]:
        code = (
            "import json, sys, workers.app\n"
            f"names = {FORBIDDEN + ALSO_REPORTED!r}\n"
            "print(json.dumps(sorted(n for n in names if n in sys.modules)))\n"
        )
        res = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if res.returncode != 0:
            raise RuntimeError(f"import workers.app failed:\n{res.stderr[-3000:]}")
        found = json.loads(res.stdout.strip().splitlines()[-1])
        base = subprocess.run(
            [sys.executable, "-c", BASELINE],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=90,
        )
        if base.returncode == 0:
            self.baseline = json.loads(base.stdout.strip().splitlines()[-1])
        else:
            self.baseline = {"error": base.stderr[-2000:]}
        return {
            "import_workers_app_imports": found,
            "forbidden_imported": [n for n in found if n in FORBIDDEN],
            "import_torch_transformers_baseline": self.baseline,
            "ok": not any(n in FORBIDDEN for n in found),
        }

    def part_tiny_c1(self) -> dict[str, Any]:
        from bench.common import Client
        from bench.data import texts

        corpus = texts()
        worker = self.worker(
            self.manifests["tiny"], concurrency=1, env={"TORCH_THREADS": str(self.cores)}
        )
        out: dict[str, Any] = {"worker": "prefork -c 1", "model": "tiny-bert 1.0.0"}
        with self.started(worker, 1) as ready:
            out["ready"] = ready
            client = Client(worker)
            try:
                out["first_job"] = self.first_and_warm(client, corpus)
                out["processes"] = self.process_check(worker, 1)
                out["correctness"] = self.correctness(client, "tiny", corpus[:8])
                out["latency"] = self.latency(worker, client, "tiny", corpus[:64])
            finally:
                client.close()
        out["ok"] = bool(out["processes"]["ok"] and out["correctness"]["ok"])
        return out

    def part_tiny_c2(self) -> dict[str, Any]:
        from bench.common import Client
        from bench.data import texts

        corpus = texts()
        worker = self.worker(
            self.manifests["tiny"],
            concurrency=2,
            env={"TORCH_THREADS": str(max(1, self.cores // 2)), "PYTHONPROFILEIMPORTTIME": "1"},
        )
        out: dict[str, Any] = {
            "worker": "prefork -c 2",
            "model": "tiny-bert 1.0.0",
            "note": "PYTHONPROFILEIMPORTTIME=1 in this worker (import check): its launch to READY "
            "includes that profiling overhead",
        }
        with self.started(worker, 2) as ready:
            out["ready"] = ready
            client = Client(worker)
            try:
                out["processes"] = self.process_check(worker, 2)
                out["correctness"] = self.correctness(client, "tiny", corpus[8:16])
            finally:
                client.close()
            log = worker.log()
        chains = import_chains(log, FORBIDDEN + ALSO_REPORTED)
        out["worker_start_imports"] = {
            "profiled": "import time:" in log,
            "found": chains,
            "forbidden_imported": sorted(n for n in chains if n in FORBIDDEN),
        }
        out["ok"] = bool(
            out["processes"]["ok"]
            and out["correctness"]["ok"]
            and not out["worker_start_imports"]["forbidden_imported"]
        )
        return out

    def part_minilm_prefork(self) -> dict[str, Any]:
        from bench.common import Client
        from bench.data import texts

        corpus = texts()
        worker = self.worker(self.minilm(), concurrency=1, env={"TORCH_THREADS": str(self.cores)})
        out: dict[str, Any] = {"worker": "prefork -c 1", "model": "MiniLM-L6 (random weights)"}
        single = [[t] for t in corpus]
        with self.started(worker, 1) as ready:
            out["ready"] = ready
            client = Client(worker)
            drivers: Drivers | None = None
            try:
                out["first_job"] = self.first_and_warm(client, corpus)
                out["processes"] = self.process_check(worker, 1)
                out["correctness"] = self.correctness(client, "minilm", corpus[:8])
                out["latency"] = self.latency(worker, client, "minilm", corpus[:64])
                self.write_partial("minilm_prefork_c1", out)
                drivers = Drivers(self.redis_url, worker.queue, self.k, self.logs, self.env())
                tp: dict[str, Any] = {}
                inflight = self.n(8, 4)
                drivers.run("sentiment.analyze", single, self.n(64, 8), inflight)  # warm
                for _ in range(self.n(2, 1)):
                    with self.ctx.block():
                        res = drivers.run("sentiment.analyze", single, self.n(512, 32), inflight)
                    res["texts_per_s"] = res["tasks_per_s"]
                    tp.setdefault("single_text", []).append(res)
                for size, tasks in ((32, self.n(32, 2)), (256, self.n(8, 1))):
                    jobs = [[corpus[i : i + size]] for i in range(0, len(corpus), size)]
                    if len(jobs[0][0]) < size:  # corpus shorter than one task
                        jobs = [[(corpus * (size // len(corpus) + 1))[:size]]]
                    drivers.run("sentiment.analyze_batch", jobs, 2, 2, timeout=120)  # warm
                    for _ in range(self.n(2, 1)):
                        with self.ctx.block():
                            res = drivers.run(
                                "sentiment.analyze_batch", jobs, tasks, 2, timeout=180
                            )
                        res["texts_per_s"] = round(tasks * size / res["seconds"], 1)
                        tp.setdefault(f"analyze_batch_{size}", []).append(res)
                out["throughput"] = tp
            finally:
                if drivers is not None:
                    drivers.close()
                client.close()
        out["ok"] = bool(out["processes"]["ok"] and out["correctness"]["ok"])
        return out

    def minilm(self) -> Path:
        manifest = self.manifests["minilm"]
        if manifest is None:
            raise RuntimeError("the MiniLM classifier was not built (see meta.models.minilm)")
        return manifest

    def write_partial(self, name: str, entry: dict[str, Any]) -> None:
        self.results["parts"][name] = {**entry, "partial": True}
        self.write()

    def part_raw(self) -> dict[str, Any]:
        from bench.data import texts

        if self.helper is None:
            raise RuntimeError("no in-process helper (see meta.inproc)")
        corpus = texts()
        out: dict[str, Any] = {
            "pipeline": "tokenizer + forward + softmax + copy to host, in-process, MiniLM",
        }
        for batch, count in ((1, self.n(256, 16)), (32, self.n(512, 64)), (256, self.n(1024, 256))):
            sample = (corpus * (count // len(corpus) + 1))[:count]
            res = self.helper.cmd(
                timeout=max(60.0, self.left()),
                cmd="raw",
                texts=sample,
                batch=batch,
                rounds=self.n(3, 1),
            )
            out[f"batch_{batch}"] = {
                "texts": count,
                "texts_per_s": [round(r, 1) for r in res["rates"]],
                "best_texts_per_s": round(max(res["rates"]), 1),
                "tokenizer_only_texts_per_s": round(res["tokenizer_only_texts_per_s"], 1),
            }
        return out

    def batcher_stats(self, client: Any) -> dict[str, int]:
        _, snap = client.call("control.publish_state", [], timeout=30)
        return dict((snap.get("stats") or {}).get("sentiment_batching") or {})

    def part_threads(self) -> dict[str, Any]:
        from bench.common import Client, med
        from bench.data import texts

        corpus = texts()
        single = [[t] for t in corpus]
        env = {"BATCH_MAX_SIZE": "256", "BATCH_WINDOW_MS": "2"}
        worker = self.worker(self.minilm(), concurrency=256, pool="threads", env=env)
        out: dict[str, Any] = {
            "worker": "threads -c 256, BATCH_MAX_SIZE=256, BATCH_WINDOW_MS=2",
            "model": "MiniLM-L6 (random weights)",
            "drivers": self.k,
        }
        with self.started(worker, 1) as ready:
            out["ready"] = ready
            client = Client(worker)
            drivers: Drivers | None = None
            try:
                drivers = Drivers(self.redis_url, worker.queue, self.k, self.logs, self.env())
                snaps = self.snapshots(worker)
                out["device"] = [s["models"]["sentiment"]["device"] for s in snaps]
                lone, _ = self.seq(client, corpus, self.n(30, 6))
                out["lone_request"] = _stats(lone[3:])
                drivers.run("sentiment.analyze", single, self.n(256, 16), 64)  # warm
                for inflight, total in (
                    (self.n(64, 8), self.n(2048, 64)),
                    (self.n(256, 32), self.n(4096, 128)),
                ):
                    runs = []
                    for _ in range(self.n(2, 1)):
                        before = self.batcher_stats(client)
                        with self.ctx.block():
                            res = drivers.run("sentiment.analyze", single, total, inflight)
                        after = self.batcher_stats(client)
                        batches = after.get("batches", 0) - before.get("batches", 0)
                        items = after.get("items", 0) - before.get("items", 0)
                        res["mean_micro_batch"] = round(items / batches, 2) if batches else None
                        res["largest_micro_batch_so_far"] = after.get("largest")
                        res["texts_per_s"] = res["tasks_per_s"]
                        runs.append(res)
                    out[f"inflight_{inflight}"] = {
                        "runs": runs,
                        "texts_per_s_median": round(med([r["texts_per_s"] for r in runs]), 1),
                    }
                    self.write_partial("threads_pool", out)
            finally:
                if drivers is not None:
                    drivers.close()
                client.close()
        return out

    def part_threads_x4(self) -> dict[str, Any]:
        """Four threads-pool worker processes (four nodes, one queue) sharing the one GPU, each
        micro-batching its own tasks: how single-text throughput scales with worker processes
        when one process's Celery consumer is the limit."""
        import contextlib
        import uuid as _uuid

        from bench.common import med
        from bench.data import texts

        single = [[t] for t in texts()]
        env = {"BATCH_MAX_SIZE": "256", "BATCH_WINDOW_MS": "2"}
        prefix = f"gpux4-{_uuid.uuid4().hex[:6]}"
        workers = [
            self.worker(
                self.minilm(),
                concurrency=128,
                pool="threads",
                env=env,
                prefix=prefix,
                node=f"{prefix}-{i}@gpu",
            )
            for i in range(4)
        ]
        k = self.k * 2
        out: dict[str, Any] = {
            "workers": "4 x threads -c 128, BATCH_MAX_SIZE=256, BATCH_WINDOW_MS=2, one queue",
            "model": "MiniLM-L6 (random weights)",
            "drivers": k,
        }
        with contextlib.ExitStack() as stack:
            out["ready"] = [stack.enter_context(self.started(w, 1)) for w in workers]
            drivers = Drivers(self.redis_url, workers[0].queue, k, self.logs, self.env())
            stack.callback(drivers.close)
            drivers.run("sentiment.analyze", single, self.n(512, 16), 256)  # warm
            for inflight, total in (
                (self.n(256, 16), self.n(4096, 64)),
                (self.n(1024, 32), self.n(8192, 128)),
            ):
                runs = []
                for _ in range(self.n(2, 1)):
                    with self.ctx.block():
                        res = drivers.run("sentiment.analyze", single, total, inflight)
                    res["texts_per_s"] = res["tasks_per_s"]
                    runs.append(res)
                out[f"inflight_{inflight}"] = {
                    "runs": runs,
                    "texts_per_s_median": round(med([r["texts_per_s"] for r in runs]), 1),
                }
                self.write_partial("threads_pool_x4", out)
            batching = []
            for w in workers:
                for snap in self.snapshots(w):
                    batching.append((snap.get("stats") or {}).get("sentiment_batching"))
            out["batcher_stats_per_worker"] = batching
        return out

    def part_ceiling(self) -> dict[str, Any]:
        """The same threads pool and Celery config, a task without a model (bench.noop): what
        the client + Celery + Redis path carries on this machine."""
        from bench.common import med
        from bench.data import texts

        single = [[t] for t in texts()]
        worker = self.worker(
            self.manifests["tiny"],
            concurrency=256,
            pool="threads",
            env={"MODEL_DEVICE": "cpu"},
            app="bench.gpu:noop_app",
        )
        inflight, total = self.n(256, 32), self.n(4096, 128)
        out: dict[str, Any] = {
            "worker": "threads -c 256, celery -A bench.gpu:noop_app (product app + bench.noop)",
            "task": "bench.noop: sentiment.analyze's input validation and result shape, no model",
            "inflight": inflight,
        }
        with self.started(worker, 1) as ready:
            out["ready"] = ready
            drivers = Drivers(self.redis_url, worker.queue, self.k, self.logs, self.env())
            try:
                drivers.run("bench.noop", single, self.n(256, 16), inflight)  # warm
                for k in sorted({self.k, 1}, reverse=True):
                    runs = []
                    for _ in range(self.n(2, 1)):
                        with self.ctx.block():
                            runs.append(
                                drivers.run("bench.noop", single, total, inflight, drivers=k)
                            )
                    out[f"drivers_{k}"] = {
                        "runs": runs,
                        "tasks_per_s_median": round(med([r["tasks_per_s"] for r in runs]), 1),
                    }
            finally:
                drivers.close()
        return out

    # -- setup -----------------------------------------------------------------------------------
    def build_models(self) -> dict[str, Any]:
        from shared.manifest import load_manifest

        real = next(s for s in load_manifest(REAL_MANIFEST).active() if s.name == "sentiment")
        tiny = write_manifest_for(self.tmp / "tiny", Path(real.location), real.version, real.sha256)
        self.manifests: dict[str, Path | None] = {"tiny": tiny, "minilm": None}
        info: dict[str, Any] = {
            "tiny_bert": {"path": real.path, "version": real.version, "sha256": real.sha256},
            "manifests": "sentiment only (required, no fallback), written under a temp dir",
        }
        try:
            info["minilm"] = self.build_minilm()
        except Exception as exc:  # the tiny-bert parts still run
            info["minilm"] = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
            print(f"MiniLM build failed: {exc}", file=sys.stderr, flush=True)
        return info

    def build_minilm(self) -> dict[str, Any]:
        from shared.manifest import artifact_sha256

        if not (MINILM_SRC / "config.json").exists():
            raise RuntimeError(f"{MINILM_SRC} is missing (carry bench/.cache/minilm-gpu-src)")
        folder = self.tmp / "minilm"
        target = folder / "sentiment"
        target.mkdir(parents=True)
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "bench.gpu", "--build-minilm", str(MINILM_SRC), str(target)],
            cwd=ROOT,
            env=self.env({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}),  # no GPU needed
            capture_output=True,
            text=True,
            timeout=180,
        )
        if res.returncode != 0:
            raise RuntimeError(f"building MiniLM failed:\n{res.stderr[-3000:]}")
        built = json.loads(res.stdout.strip().splitlines()[-1])
        sha = artifact_sha256(target)
        self.manifests["minilm"] = write_manifest_for(folder, target, "minilm-rand-1.0.0", sha)
        return {
            "built_from": str(MINILM_SRC.relative_to(ROOT)),
            "how": "AutoModelForSequenceClassification.from_config, torch.manual_seed(0), "
            "save_pretrained with the tokenizer; loaded by the product loader via a "
            "sha256-checked manifest",
            "weights": "random: same architecture and tensor shapes as the trained MiniLM-L6 "
            "classifier, so the same time per forward pass; labels are meaningless",
            "parameters": built["parameters"],
            "files": built["files"],
            "sha256": sha,
            "build_s": round(time.monotonic() - t0, 1),
        }

    def start_helper(self) -> dict[str, Any]:
        threads = self.cores
        minilm = self.manifests["minilm"]
        self.helper = JsonProc(
            "inproc",
            [
                sys.executable,
                "-m",
                "bench.gpu",
                "--inproc",
                "--tiny",
                str(self.manifests["tiny"]),
                "--minilm",
                str(minilm or ""),
                "--raw-model",
                str(minilm.parent / "sentiment") if minilm else "",
                "--threads",
                str(threads),
            ],
            self.env({"OMP_NUM_THREADS": str(threads)}),
            self.logs,
        )
        first = self.helper.read(timeout=max(30.0, min(180.0, self.left())))
        bad = {k: v for k, v in first["models"].items() if v["status"] != "READY"}
        if bad:
            raise RuntimeError(f"in-process models not READY: {bad}")
        if not self.cpu and not first["cuda_available"]:
            raise RuntimeError("torch.cuda.is_available() is False in the in-process helper")
        return first

    def main(self) -> int:
        from bench.common import Ctx, git_commit, loadavg, machine
        from bench.data import texts_source
        from workers.embedded import EmbeddedRedis

        os.environ["MODEL_DEVICE"] = self.device
        self.results["meta"] = {
            "command": "python -m bench.gpu " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "mode": "cpu-check" if self.cpu else "gpu",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "git": git_commit(),
            "texts": texts_source(),
            "model_device": self.device,
            "driver_processes": self.k,
            "budget_s": self.args.budget,
            "loadavg_start": loadavg(),
            "complete": False,
        }
        self.write()
        t0 = time.monotonic()
        status = 0
        interrupted = False
        redis_server = EmbeddedRedis()
        try:
            redis_server.start()
            self.redis_url = redis_server.url
            self.ctx = Ctx(redis_url=self.redis_url, logs=self.logs, quick=True)
            self.results["meta"]["models"] = self.build_models()
            self.write()
            try:
                helper = self.start_helper()
            except Exception as exc:  # the worker-side checks still run
                helper = {"error": f"{type(exc).__name__}: {exc}"[:3000]}
                self.results["errors"]["inproc"] = traceback.format_exc()[-4000:]
                print(f"in-process helper failed: {exc}", file=sys.stderr, flush=True)
                if self.helper is not None:
                    self.helper.close()
                    self.helper = None
            self.results["meta"]["inproc"] = helper
            for key in ("torch", "torch_cuda", "transformers", "gpu_name", "cuda_available"):
                self.results["meta"][key] = helper.get(key)
            self.write()
            self.part("imports", self.part_imports, 10)
            self.part("tiny_prefork_c1", self.part_tiny_c1, 30)
            self.part("tiny_prefork_c2", self.part_tiny_c2, 30)
            self.part("minilm_prefork_c1", self.part_minilm_prefork, 40)
            self.part("raw_inprocess", self.part_raw, 15)
            self.part("threads_pool", self.part_threads, 35)
            self.part("client_ceiling", self.part_ceiling, 25)
            self.part("threads_pool_x4", self.part_threads_x4, 40)
        except BaseException as exc:
            status = 1
            interrupted = not isinstance(exc, Exception)
            self.results["errors"]["setup" if not interrupted else "interrupted"] = (
                traceback.format_exc()[-4000:]
            )
            print(f"setup failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            if self.helper is not None:
                self.helper.close()
            redis_server.close()
            self.results["meta"]["wall_s"] = round(time.monotonic() - t0, 1)
            self.results["meta"]["loadavg_end"] = loadavg()
            self.results["meta"]["complete"] = not interrupted
            self.results["table"] = table(self.results)
            self.write()
            self.pack_logs()
            shutil_rmtree(self.tmp)
        print("\n".join(self.results["table"]))
        failed = [
            n for n, p in self.results["parts"].items() if p.get("error") or p.get("ok") is False
        ]
        if failed:
            print(f"\nparts failed or not ok: {failed}", flush=True)
        print(f"\nwall {self.results['meta']['wall_s']:.0f} s; results: {self.out}", flush=True)
        return 1 if (status or failed) else 0

    def pack_logs(self) -> None:
        """Worker, in-process and driver logs next to --out (each cut to its last 4 MiB)."""
        with suppress(Exception):
            target = self.out.with_name(self.out.stem + "-logs.tar.gz")
            with tarfile.open(target, "w:gz") as tar:
                for path in sorted(self.logs.iterdir()):
                    data = path.read_bytes()[-(4 << 20) :]
                    info = tarfile.TarInfo(path.name)
                    info.size = len(data)
                    info.mtime = int(time.time())
                    tar.addfile(info, io.BytesIO(data))
            self.results["meta"]["logs"] = target.name
            self.write()


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---- the table -----------------------------------------------------------------------------------
def numbered(part: dict[str, Any], prefix: str) -> list[str]:
    """The keys ``PREFIX<n>`` of a part's results, by ``n`` (``inflight_64``, ``drivers_4``...)."""
    keys = [k for k in part if k.startswith(prefix)]
    return sorted(keys, key=lambda k: int(k[len(prefix) :]))


def table(results: dict[str, Any]) -> list[str]:
    parts = results.get("parts", {})
    meta = results.get("meta", {})
    rows: list[tuple[str, str]] = []

    def g(d: Any, *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    def f(x: Any, fmt: str = "{:.2f}") -> str:
        return "-" if x is None else fmt.format(x)

    rows.append(("device / GPU", f"{meta.get('model_device')} / {meta.get('gpu_name')}"))
    rows.append(
        ("imports of workers.app (forbidden)", str(g(parts, "imports", "forbidden_imported")))
    )
    rows.append(
        (
            "worker start imports (forbidden)",
            str(g(parts, "tiny_prefork_c2", "worker_start_imports", "forbidden_imported")),
        )
    )
    for name, label in (
        ("tiny_prefork_c1", "tiny -c1"),
        ("tiny_prefork_c2", "tiny -c2"),
        ("minilm_prefork_c1", "MiniLM -c1"),
    ):
        if name not in parts:
            continue
        p = parts[name]
        if p.get("error") or p.get("skipped"):
            rows.append(
                (
                    label,
                    (f"ERROR {p['error']}" if p.get("error") else f"SKIPPED {p['skipped']}")[:120],
                )
            )
            continue
        devices = [x["device"] for x in g(p, "processes", "pool_processes") or []]
        rows.append(
            (
                f"{label}: READY s / devices / parent CUDA-free / ok",
                f"{f(g(p, 'ready', 'launch_to_ready_s'))} / {devices} / "
                f"{g(p, 'processes', 'parent_has_no_cuda')} / {p.get('ok')}",
            )
        )
        c = p.get("correctness") or {}
        rows.append(
            (
                f"{label}: answers = in-process (max |score diff|)",
                f"{c.get('ok')} ({f(c.get('max_score_diff'), '{:.2e}')})",
            )
        )
        if p.get("first_job"):
            fj = p["first_job"]
            rows.append(
                (
                    f"{label}: first task / warm p50 ms",
                    f"{f(fj['first_ms'])} / {f(fj['warm']['p50_ms'])} "
                    f"({f(fj['ratio_first_to_warm_p50'])}x)",
                )
            )
        if (p.get("latency") or {}).get("inproc"):
            lt = p["latency"]
            rows.append(
                (
                    f"{label}: p50/p99 ms in-process vs Celery",
                    f"{f(lt['inproc']['p50_ms'])}/{f(lt['inproc']['p99_ms'])} vs "
                    f"{f(lt['celery']['p50_ms'])}/{f(lt['celery']['p99_ms'])} "
                    f"({f(lt['p50_ratio'])}x, +{f(lt['p50_diff_ms'])} ms)",
                )
            )
        for key, runs in (p.get("throughput") or {}).items():
            best = max(r["texts_per_s"] for r in runs)
            rows.append((f"{label}: {key} texts/s (best)", f"{best:.0f}"))
    raw = parts.get("raw_inprocess", {})
    for b in (1, 32, 256):
        if f"batch_{b}" in raw:
            r = raw[f"batch_{b}"]
            rows.append(
                (
                    f"raw in-process MiniLM batch {b} texts/s (tokenizer only)",
                    f"{r['best_texts_per_s']:.0f} ({r['tokenizer_only_texts_per_s']:.0f})",
                )
            )
    tp = parts.get("threads_pool", {})
    if tp.get("lone_request"):
        rows.append(("threads pool: lone request p50 ms", f(tp["lone_request"]["p50_ms"])))
    for key in numbered(tp, "inflight_"):
        runs = tp[key]["runs"]
        mb = [r["mean_micro_batch"] for r in runs if r.get("mean_micro_batch")]
        rows.append(
            (
                f"threads pool {key.replace('_', ' ')}: texts/s, mean micro-batch, p50 ms",
                f"{tp[key]['texts_per_s_median']:.0f}, {f(max(mb) if mb else None)}, "
                f"{f(runs[-1]['p50_ms'])}",
            )
        )
    if tp.get("error"):
        rows.append(("threads pool", f"ERROR {tp['error']}"[:120]))
    raw256 = g(raw, "batch_256", "best_texts_per_s")
    if raw256:
        for key in numbered(tp, "inflight_"):
            rows.append(
                (
                    f"threads pool {key.replace('_', ' ')} / raw batch 256",
                    f"{tp[key]['texts_per_s_median'] / raw256:.2f}x",
                )
            )
        mp = parts.get("minilm_prefork_c1", {}).get("throughput") or {}
        if mp.get("analyze_batch_256"):
            best = max(r["texts_per_s"] for r in mp["analyze_batch_256"])
            rows.append(
                ("analyze_batch 256 (prefork -c1) / raw batch 256", f"{best / raw256:.2f}x")
            )
    ce = parts.get("client_ceiling", {})
    for key in numbered(ce, "drivers_"):
        rows.append(
            (
                f"ceiling: bench.noop tasks/s, {key.replace('_', ' ')}",
                f"{ce[key]['tasks_per_s_median']:.0f}",
            )
        )
    if ce.get("error"):
        rows.append(("ceiling", f"ERROR {ce['error']}"[:120]))
    x4 = parts.get("threads_pool_x4", {})
    for key in numbered(x4, "inflight_"):
        rows.append(
            (
                f"4 threads-pool workers {key.replace('_', ' ')}: texts/s, p50 ms",
                f"{x4[key]['texts_per_s_median']:.0f}, {f(x4[key]['runs'][-1]['p50_ms'])}",
            )
        )
    if x4.get("batcher_stats_per_worker"):
        st = [b for b in x4["batcher_stats_per_worker"] if b]
        items, batches = sum(b["items"] for b in st), sum(b["batches"] for b in st)
        rows.append(
            (
                "4 threads-pool workers: mean micro-batch (all runs)",
                f(items / batches if batches else None),
            )
        )
    if x4.get("error"):
        rows.append(("threads_pool_x4", f"ERROR {x4['error']}"[:120]))
    width = max(len(r[0]) for r in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]


# ---- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/gpu.json")
    parser.add_argument("--cpu-check", action="store_true", help="MODEL_DEVICE=cpu, tiny counts")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts")
    parser.add_argument("--drivers", type=int, default=0, help="driver processes (0: 4, cpu 2)")
    parser.add_argument("--only", default="", help=f"comma-separated parts of: {', '.join(PARTS)}")
    parser.add_argument("--inproc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", help=argparse.SUPPRESS)
    parser.add_argument("--minilm", help=argparse.SUPPRESS)
    parser.add_argument("--raw-model", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=2, metavar=("REDIS_URL", "QUEUE"), help=argparse.SUPPRESS)
    parser.add_argument("--build-minilm", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_minilm:
        return build_minilm_main(*args.build_minilm)
    if args.drive:
        return drive_main(*args.drive)
    if args.inproc:
        return inproc_main(args)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    if args.budget is None:
        args.budget = 600.0 if args.cpu_check else 200.0

    # SIGTERM (timeout(1)) unwinds like an exception: every process is stopped by PID; a second
    # one is ignored so that it cannot cut the clean-up short
    def on_term(*_: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    return Run(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
