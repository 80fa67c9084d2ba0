"""CPU backends of the transformers models, torch vs ONNX Runtime (docs/benchmarks.md).

Speed, in this process: the family's ``classify`` on bench.data.texts(), one text per call (p50,
1 thread) and batches of 32 (texts/s, 1 and 2 threads), ONNX Runtime with and without option
onnx_prepack; medians of ``--rounds`` rounds, each after a quiet gate and run again while other
processes used over 0.3 of a core (``foreign_cores``: the most they used in a kept round).
Memory (``--memory``): bench.memory.backend_memory.

    .venv/bin/python -m bench.backends [--rounds 3] [--models sentiment,minilm] [--memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.context import CORES, _cpu_times, pct
from bench.data import ROOT, ensure_minilm, texts


def clean_round(fn: Any) -> tuple[float, float]:
    """``fn()`` once the machine is quiet, again while others used over 0.3 of a core
    meanwhile: (its result, the cores other processes used during the last try)."""
    for _ in range(3):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            total0, idle0 = _cpu_times()
            time.sleep(0.5)
            total1, idle1 = _cpu_times()
            if (total1 - total0 - (idle1 - idle0)) / max(1, total1 - total0) * CORES <= 0.35:
                break
        (total0, idle0), cpu0, t0 = _cpu_times(), time.process_time(), time.monotonic()
        result = fn()
        (total1, idle1), cpu, wall = _cpu_times(), time.process_time() - cpu0, time.monotonic() - t0
        busy = (total1 - total0 - (idle1 - idle0)) / max(1, total1 - total0) * CORES * wall
        foreign = max(0.0, busy - cpu) / wall
        if foreign <= 0.3:
            break
    return result, foreign


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


def speed(folder: Path, rounds: int) -> dict[str, Any]:
    corpus, out = texts(), {}

    def single(model: Any) -> float:
        lat = []
        for text in corpus:
            t0 = time.perf_counter()
            model.classify([text])
            lat.append(time.perf_counter() - t0)
        return pct(lat, 50) * 1000

    def batches(model: Any) -> float:
        t0 = time.perf_counter()
        for i in range(0, len(corpus), 32):
            model.classify(corpus[i : i + 32])
        return len(corpus) / (time.perf_counter() - t0)

    for threads in (1, 2):
        models = {b: loaded(folder, b, threads) for b in ("torch", "onnx", "onnx+prepack")}
        runs: dict[str, dict[str, list[float]]] = {b: {} for b in models}
        for _ in range(rounds):
            for backend, model in models.items():
                for name, fn in (("single_p50_ms", single), ("batch32_texts_per_s", batches)):
                    if name == "single_p50_ms" and threads > 1:
                        continue
                    value, foreign = clean_round(lambda fn=fn, model=model: fn(model))
                    runs[backend].setdefault(name, []).append(value)
                    runs[backend].setdefault("foreign_cores", []).append(foreign)
        for backend, r in runs.items():
            out[f"{backend}, {threads} thread(s)"] = {
                k: round(max(v) if k == "foreign_cores" else statistics.median(v), 2)
                for k, v in r.items()
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__)
    parser.add_argument("--models", default="sentiment,minilm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", action="store_true", help="memory instead of speed")
    args = parser.parse_args(argv)
    from shared.families.transformers_onnx import ONNX_FILE, export_onnx

    minilm = ensure_minilm()
    if not (minilm / ONNX_FILE).exists():
        export_onnx(minilm)
    folders = {"sentiment": ROOT / "models" / "sentiment" / "1.0.0", "minilm": minilm}
    if args.memory:
        from bench.memory import backend_memory

        results = backend_memory(minilm)
    else:
        results = {n: speed(folders[n], args.rounds) for n in args.models.split(",")}
    print(json.dumps(results, indent=2))
    name = "backends-memory.json" if args.memory else "backends.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
