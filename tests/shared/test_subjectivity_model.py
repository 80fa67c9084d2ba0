"""The subjectivity model (models/subjectivity/, built by scripts/build_models.py) loads through
the product's own path (model repository -> registry -> transformers family), answers
``objective`` / ``subjective``, and answers like the transformers pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.manifest import ModelSpec, verify_artifact
from shared.registry import ModelRegistry
from shared.repository import load_repository

ROOT = Path(__file__).resolve().parents[2]

PLOT = "a lonely sailor sets out across the pacific to find his brother."
REVIEW = "a witty, moving and beautifully acted film."
# Held-out texts (films the model was not trained on) that it classifies correctly.
HELD_OUT = [
    ("A sailor prone to violent outbursts is sent to a naval psychiatrist for help.", "objective"),
    ("The plot is romantic comedy boilerplate from start to finish.", "subjective"),
]


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return load_repository(ROOT / "models").get("subjectivity")


@pytest.fixture(scope="module")
def model(spec: ModelSpec) -> Iterator[Any]:
    registry = ModelRegistry()
    registry.load_all([spec])
    try:
        yield registry.get("subjectivity")
    finally:
        registry.close()


def test_the_artifact_matches_its_model_file(spec: ModelSpec) -> None:
    assert spec.family == "transformers" and spec.version == "1.0.0"
    assert not spec.required and not spec.fallback
    assert verify_artifact(spec) == Path(spec.location)


def test_it_answers_objective_for_a_plot_and_subjective_for_a_review(model: Any) -> None:
    (plot_label, plot_score), (review_label, review_score) = model.classify([PLOT, REVIEW])
    assert (plot_label, review_label) == ("objective", "subjective")
    assert 0.5 < plot_score <= 1.0 and 0.5 < review_score <= 1.0
    assert [label for label, _ in model.classify([t for t, _ in HELD_OUT])] == [
        want for _, want in HELD_OUT
    ]
    assert model.describe()["labels"] == ["objective", "subjective"]


def test_it_answers_like_the_transformers_pipeline(spec: ModelSpec, model: Any) -> None:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    texts = [PLOT, REVIEW, *(t for t, _ in HELD_OUT), "ok"]
    for (label, score), want in zip(model.classify(texts), pipe(texts), strict=True):
        assert label == want["label"] and score == pytest.approx(want["score"], abs=1e-5)
