"""The "one plain Python process" side of every comparison (no Celery, no Redis).

``python -m bench.helper --manifest M [--threads T] [--serve] [--raw-model DIR]``

1. imports the stack and loads the manifest's active models with ``shared.registry``'s
   ``ModelRegistry.load_all`` (same loader, checksums and warm-ups as a worker process),
2. answers one ``sentiment`` call and prints ``{"event": "answer", ...}`` (the bare process of the
   cold-start comparison is timed from its spawn to this line),
3. with ``--serve``: reads JSON commands on stdin, one per line, and answers each on stdout:
   ``latency`` (per-call ms of a family on given inputs, called in-process), ``raw_throughput``
   (tokenizer + model forward on batches, no registry), ``touch`` (a few calls of each model)
   and ``memory`` (this process's PSS / private memory), ``quit``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """Fields of /proc/PID/smaps_rollup in KiB (Pss, Private_Clean, Private_Dirty, Rss...)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


class Server:
    def __init__(self, registry: Any, raw_model: str | None) -> None:
        self.registry = registry
        self.raw_model = raw_model
        self._raw: tuple[Any, Any] | None = None

    # -- commands ---------------------------------------------------------------------------
    def call(self, family: str, job: Any) -> Any:
        reg = self.registry
        if family == "sentiment":
            return reg.get("sentiment").classify([job])
        if family == "sentiment_batch":
            return reg.get("sentiment").classify(job)
        if family == "clustering":
            return reg.get("customer_segments").predict(job)
        if family == "predict":
            return reg.get(job[0]).forecast(job[1])
        if family == "prophet":
            from shared.families.prophet_forecaster import fit_prophet

            series, horizon, freq = job
            return fit_prophet(series["ds"], series["y"], horizon, freq)
        if family == "arima":
            from shared.families.arima_forecaster import fit_arima

            series, horizon, order = job
            return fit_arima(series["y"], horizon, tuple(order), ds=series.get("ds"))
        raise ValueError(family)

    def latency(self, family: str, inputs: list[Any], n: int, gap: float = 0.0) -> list[float]:
        """Per-call ms; ``gap``: seconds idle before each call (the model's own cost of a call
        after a pause, e.g. torch's OpenMP threads gone to sleep)."""
        out = []
        for i in range(n):
            job = inputs[i % len(inputs)]
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            self.call(family, job)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    def raw(self) -> tuple[Any, Any]:
        if self._raw is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            assert self.raw_model, "--raw-model not given"
            tok = AutoTokenizer.from_pretrained(self.raw_model)
            model = AutoModelForSequenceClassification.from_pretrained(self.raw_model).eval()
            self._raw = (tok, model)
        return self._raw

    def raw_throughput(self, texts: list[str], batch: int, rounds: int) -> list[float]:
        """texts/s of tokenizer + forward + softmax over ``texts`` in batches, per round."""
        import torch

        tok, model = self.raw()
        with torch.inference_mode():  # one warm batch
            model(
                **tok(
                    texts[:batch],
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
            )
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(texts), batch):
                    enc = tok(
                        texts[i : i + batch],
                        padding=True,
                        truncation=True,
                        max_length=128,
                        return_tensors="pt",
                    )
                    torch.softmax(model(**enc).logits, dim=-1).max(dim=-1)
            rates.append(len(texts) / (time.perf_counter() - t0))
        return rates

    def touch(self, jobs: dict[str, Any], times: int) -> None:
        for _ in range(times):
            for family, job in jobs.items():
                self.call(family, job)

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd["cmd"]
        if kind == "latency":
            gap = float(cmd.get("gap", 0.0))
            return {"ms": self.latency(cmd["family"], cmd["inputs"], int(cmd["n"]), gap)}
        if kind == "raw_throughput":
            return {
                "rates": self.raw_throughput(cmd["texts"], int(cmd["batch"]), int(cmd["rounds"]))
            }
        if kind == "touch":
            self.touch(cmd["jobs"], int(cmd.get("times", 3)))
            return {"ok": True}
        if kind == "memory":
            return {"smaps": smaps_rollup()}
        if kind == "threads":
            import torch

            return {"torch_threads": torch.get_num_threads()}
        raise ValueError(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--text", default="The film was a delight from start to finish.")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--raw-model")
    parser.add_argument("--loader-threads", type=int, default=4)
    args = parser.parse_args(argv)

    t_start = time.time()
    from shared.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()  # HF_HOME / offline flags, as a worker does
    threads = args.threads or settings.resolved_torch_threads(1)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from shared.manifest import load_manifest
    from shared.registry import ModelRegistry

    manifest = load_manifest(
        __import__("pathlib").Path(args.manifest), default_version=settings.model_version
    )
    registry = ModelRegistry(
        device=settings.model_device,
        load_timeout=settings.load_timeout_seconds,
        loader_threads=args.loader_threads,
        warmup=True,
    )
    registry.load_all(manifest.active())
    t_loaded = time.time()
    ready, reasons = registry.readiness()
    ((label, score),) = registry.get("sentiment").classify([args.text])
    emit(
        {
            "event": "answer",
            "label": label,
            "score": score,
            "ready": ready,
            "reasons": reasons,
            "started": t_start,
            "loaded": t_loaded,
            "answered": time.time(),
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
    )
    if not args.serve:
        return 0
    server = Server(registry, args.raw_model)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            emit({"ok": True})
            break
        try:
            emit({"ok": True, **server.handle(cmd)})
        except Exception as exc:  # reported to the orchestrator, which fails the section
            emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
