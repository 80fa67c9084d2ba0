"""CPU backends of the transformers models, torch vs ONNX Runtime (sections ``backends`` and
``backend_memory``, not part of a full run: ``python -m bench.run --only backends``).

Speed, in the orchestrating process: the family's ``classify`` on ``bench.data.texts()``, one
text per call (p50, 1 thread) and batches of 32 (texts/s, 1 and 2 threads), ONNX Runtime with and
without option onnx_prepack; medians of rounds, each a measurement block. Memory: total PSS of
prefork workers of 1, 2 and 4 processes per backend, on the shipped repository and on one whose
sentiment model is the MiniLM classifier (exported to ONNX in its own copy).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from bench.data import CACHE, REAL_MODELS, _link, ensure_minilm, repository, texts
from bench.memory import measure_worker
from bench.run import Ctx, med, pct, rnd


def minilm_onnx() -> Path:
    """A copy of the MiniLM classifier with its ``model.onnx`` (the original stays torch-only)."""
    from shared.families.transformers_onnx import ONNX_FILE, export_onnx

    folder = CACHE / "minilm-onnx"
    if not (folder / ONNX_FILE).exists():
        _link(ensure_minilm(), folder)
        export_onnx(folder)
    return folder


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


def single(model: Any) -> float:
    lat = []
    for text in texts():
        t0 = time.perf_counter()
        model.classify([text])
        lat.append(time.perf_counter() - t0)
    return pct(lat, 50) * 1000


def batches(model: Any) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(texts()), 32):
        model.classify(texts()[i : i + 32])
    return len(texts()) / (time.perf_counter() - t0)


def run(ctx: Ctx) -> dict[str, Any]:
    folders = {"tiny-bert": REAL_MODELS / "sentiment" / "1.0.0", "minilm": minilm_onnx()}
    raw: dict[str, Any] = {}
    for label, folder in folders.items():
        for threads in (1, 2):
            models = {b: loaded(folder, b, threads) for b in ("torch", "onnx", "onnx+prepack")}
            for _ in range(ctx.n(3, 1)):
                for backend, model in models.items():
                    for name, fn in (("single_p50_ms", single), ("batch32_texts_per_s", batches)):
                        if name == "batch32_texts_per_s" or threads == 1:
                            key = f"{label}, {backend}, {threads} thread(s): {name}"
                            raw.setdefault(key, []).append(ctx.measure(partial(fn, model)))
    return {"raw": raw, "summary": {k: rnd(med(v), 2) for k, v in raw.items()}}


def memory(ctx: Ctx) -> dict[str, Any]:
    repos = {"shipped": REAL_MODELS, "minilm": repository("minilm-onnx", sentiment=minilm_onnx())}
    raw: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for label, repo in repos.items():
        for n in (1, 2, 4):
            for backend in ("torch", "onnx"):
                env = {"MODEL_REPOSITORY": str(repo), "TRANSFORMERS_BACKEND": backend}
                worker = ctx.worker(concurrency=n, env=env)
                key = f"{label}, {n} process(es), {backend}"
                mem = raw[key] = measure_worker(
                    ctx, worker, n, at_ready=False, calls=6, batches=True
                )
                private = [p["private_mib"] for p in mem["processes"] if p["role"] == "child"]
                summary[f"{key}: total PSS MiB (distinct) / private per child"] = (
                    f"{mem['total_pss_mib']:.0f} ({mem['unique_resident_mib']}) / {private}"
                )
    return {"raw": raw, "summary": summary}
