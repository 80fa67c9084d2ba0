"""The in-process side of every comparison, and the JSON-lines protocol; stdlib-only top imports."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from subprocess import PIPE, Popen, TimeoutExpired
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# model settings a spawned process must not inherit from whoever started the benchmark
INHERITED = """TORCH_THREADS OMP_NUM_THREADS PRELOAD_MODE PREIMPORT LOADER_THREADS SENTIMENT_MODEL
MODEL_MANIFEST MODEL_REPOSITORY BATCH_WINDOW_MS BATCH_MAX_SIZE WORKER_POOL WORKER_CONCURRENCY
REDIS_URL KEY_PREFIX TASK_QUEUE"""


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for spawned processes: no inherited model settings."""
    drop = {n for name in INHERITED.split() for n in (name, "MODELWORKERS_" + name)}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **(extra or {})}


def serve(first: dict[str, Any], handle: Callable[..., dict[str, Any]]) -> int:
    """Answer ``first``, then each command with ``handle(**command)`` until ``quit``, on a copy of
    stdout: fd 1 points at stderr, so that what a library prints lands in the log instead."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    out.write(json.dumps(first, default=str) + "\n")
    for line in filter(str.strip, sys.stdin):
        cmd = json.loads(line)
        try:
            answer = {"ok": True, **handle(**cmd)}
        except Exception as exc:  # reported to the orchestrator, which fails the section
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer, default=str) + "\n")
        if cmd["cmd"] == "quit":
            break
    return 0


class Closing(AbstractContextManager):  # type: ignore[type-arg]
    """``with X(...) as x:`` calls ``x.close()`` at the end."""

    close: Callable[[], None]

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonProc(Closing):
    """A helper process (``python ARGS``), its stderr in ``logs``, every read with a deadline."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self._buf, self.t_spawn = name, b"", time.time()
        self.log_path = logs / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        cmd = [sys.executable, *args]
        self.proc = Popen(cmd, cwd=ROOT, env=env, stdin=PIPE, stdout=PIPE, stderr=self._log)
        self.pid = self.proc.pid

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
            readable = select.select([self.proc.stdout], [], [], 1.0)[0]
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20) if readable else b""
            self._buf += chunk
            if chunk or (not readable and self.proc.poll() is None):  # else: EOF or exited
                continue
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited ({self.proc.poll()}):\n{tail}")
        line, self._buf = self._buf.split(b"\n", 1)
        return dict(json.loads(line))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, cmd: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        self.send({"cmd": cmd, **args})
        if not (out := self.read(timeout)).get("ok"):
            raise RuntimeError(f"{self.name} {cmd} failed: {out.get('error')}")
        return out

    def close(self) -> None:
        with suppress(Exception):
            self.send({"cmd": "quit"})
        with suppress(TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc.kill()  # not if it has exited
        self.proc.wait(timeout=5)
        self._log.close()


class Helper(JsonProc):
    """``python -m bench.helper`` (``threads``: torch threads, 0: the product's default)."""

    def __init__(self, models: Path, *, threads: int, logs: Path, **kw: Any) -> None:
        args = ["-m", "bench.helper", "--models", str(models), "--threads", str(threads)]
        args += [x for k, v in kw.items() if v for x in (f"--{k.replace('_', '-')}", str(v))]
        omp = {"OMP_NUM_THREADS": str(threads)} if threads else {}
        super().__init__("helper", args, clean_env(omp), logs)
        try:
            self.first = self.read(300)
        except BaseException:
            self.close()
            raise
        self.t_answer = time.time()

    def latency(self, family: str, inputs: list[Any], n: int, **kw: Any) -> list[float]:
        """ms of each call (``gap``, ``model``: ``Server.latency``'s)."""
        return list(self.cmd("latency", family=family, inputs=inputs, n=n, **kw)["ms"])

    def raw_rates(self, texts: list[str], batch: int = 32, rounds: int = 1) -> list[float]:
        return list(self.cmd("raw_throughput", texts=texts, batch=batch, rounds=rounds)["rates"])


class Server:
    """The child's commands: the registry's models called directly, and the raw pipeline."""

    def __init__(self, registry: Any, raw_model: str | None, device: str) -> None:
        self.registry, self.raw_model, self.device = registry, raw_model, device
        self._raw: tuple[Any, Any] | None = None

    def call(self, family: str, job: Any, model: str = "sentiment") -> Any:
        """What the task of ``family`` calls, on the arguments ``bench.data.jobs`` gives."""
        reg = self.registry
        if family in ("sentiment", "models_predict"):
            return reg.get(model).classify([job])
        if family == "clustering":
            return reg.get("customer_segments").predict(job)
        if family == "predict":
            return reg.get(job[0]).forecast(job[1])
        if family == "prophet":
            from shared.families.prophet_forecaster import fit_prophet

            return fit_prophet(job[0]["ds"], job[0]["y"], job[1], job[2])
        if family == "arima":
            from shared.families.arima_forecaster import fit_arima

            return fit_arima(job[0]["y"], job[1], tuple(job[2]), ds=job[0].get("ds"))
        if family == "fit":
            from shared.families.sklearn_pipeline import fit_kmeans

            return fit_kmeans(job[0], job[1])
        raise ValueError(family)

    def latency(
        self, family: str, inputs: list[Any], n: int, gap: float = 0.0, model: str = "sentiment"
    ) -> dict[str, Any]:
        """Per-call ms; ``gap``: seconds idle before each call (the model's cost after a pause)."""
        out = []
        for i in range(n):
            time.sleep(gap)
            t0 = time.perf_counter()
            self.call(family, inputs[i % len(inputs)], model)
            out.append((time.perf_counter() - t0) * 1000)
        return {"ms": out}

    def answers(self, texts: list[str], model: str = "sentiment") -> dict[str, Any]:
        """[label, score] of each text, one text per call (as a task)."""
        return {"answers": [list(self.call("sentiment", t, model)[0]) for t in texts]}

    def forward(self, texts: list[str]) -> None:
        """Tokenizer + forward + softmax + the answers copied to the host, as the product does."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._raw is None:
            model = AutoModelForSequenceClassification.from_pretrained(self.raw_model).eval()
            tok = AutoTokenizer.from_pretrained(self.raw_model)
            self._raw = (tok, model.to(self.device) if self.device != "cpu" else model)
        tok, model = self._raw
        enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()} if self.device != "cpu" else enc
        scores, idx = torch.softmax(model(**enc).logits.float(), dim=-1).max(dim=-1)
        idx.tolist(), scores.tolist()

    def raw_throughput(self, texts: list[str], batch: int, rounds: int) -> dict[str, Any]:
        """texts/s of ``forward`` per round, in batches."""
        import torch

        out: dict[str, Any] = {"rates": []}
        with torch.inference_mode():
            self.forward(texts[:batch])  # warm this shape
            for _ in range(rounds):
                t0 = time.perf_counter()
                for i in range(0, len(texts), batch):
                    self.forward(texts[i : i + batch])
                out["rates"].append(len(texts) / (time.perf_counter() - t0))
        return out

    def handle(self, cmd: str, **args: Any) -> dict[str, Any]:
        if cmd not in ("latency", "answers", "raw_throughput", "quit"):
            raise ValueError(cmd)
        return {} if cmd == "quit" else dict(getattr(self, cmd)(**args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True, help="a model repository")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    parser.add_argument("--text", default="The film was a delight from start to finish.")
    parser.add_argument("--raw-model")
    args = parser.parse_args(argv)
    t_start = time.time()
    from shared.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()  # HF_HOME / offline flags, as a worker does
    threads = args.threads or settings.resolved_torch_threads(1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch  # as a worker's parent preimports its families (also before the loader threads)
    import transformers

    torch.set_num_threads(threads)
    from shared.families.transformers_sentiment import resolve_device
    from shared.registry import ModelRegistry
    from shared.repository import load_repository

    timeout = settings.load_timeout_seconds
    registry = ModelRegistry(device=settings.model_device, load_timeout=timeout, warmup=True)
    registry.load_all(load_repository(Path(args.models)).active())
    t_loaded = time.time()
    ready, reasons = registry.readiness()
    ((label, score),) = registry.get("sentiment").classify([args.text])
    first = {"ok": True, "label": label, "score": score, "ready": ready, "reasons": reasons}
    first.update(started=t_start, loaded=t_loaded, answered=time.time(), pid=os.getpid())
    keys = ("status", "device", "error", "load_seconds")
    models = registry.snapshot()["models"].items()
    first["models"] = {name: {k: m.get(k) for k in keys} for name, m in models}
    cuda = torch.cuda.is_available()
    first.update(torch_threads=threads, torch=torch.__version__, torch_cuda=torch.version.cuda)
    first.update(transformers=transformers.__version__, cuda_available=cuda)
    first["gpu_name"] = torch.cuda.get_device_name(0) if cuda else None
    server = Server(registry, args.raw_model, resolve_device(settings.model_device))
    return serve(first, server.handle)


if __name__ == "__main__":
    raise SystemExit(main())
