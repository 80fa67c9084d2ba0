"""Each model family loads the project's real artifact and answers like its library does."""

from __future__ import annotations

import pytest

from shared.families import family_class
from shared.families.textblob_sentiment import polarity_to_label
from shared.manifest import ModelSpec, load_manifest
from tests.conftest import MANIFEST


@pytest.fixture(scope="module")
def specs() -> dict[str, ModelSpec]:
    return {s.name: s for s in load_manifest(MANIFEST).active()}


def loaded(spec: ModelSpec):  # type: ignore[no-untyped-def]
    model = family_class(spec.family)(spec, device="cpu")
    model.load()
    return model


def test_transformers_family_equals_the_transformers_pipeline(specs: dict[str, ModelSpec]) -> None:
    from transformers import pipeline

    spec = specs["sentiment"]
    model = loaded(spec)
    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    texts = ["a joyous, beautiful film", "boring and far too long", "ok"]
    for (label, score), want in zip(model.classify(texts), pipe(texts), strict=True):
        assert label == want["label"].lower() and score == pytest.approx(want["score"], abs=1e-5)
    assert model.describe()["labels"] == ["negative", "positive"]
    model.unload()


def test_length_sorted_forward_passes_answer_like_one_padded_batch(
    specs: dict[str, ModelSpec],
) -> None:
    """BATCH_PAD_RATIO splits a mixed-length batch into tighter forward passes (CPU); the
    answers, in the caller's order, are those of one padded pass and of one text at a time."""
    model = loaded(specs["sentiment"])
    texts = [
        "ok",
        "an utterly wonderful, moving and beautifully acted film that I would watch again " * 3,
        "bad",
        "boring and far too long, with a plot that goes nowhere at all",
        "fine",
        "great",
        "the worst meal I have had in years; cold, late and overpriced",
    ]
    assert model.pad_ratio > 0  # CPU default
    grouped = model.classify(texts)
    model.pad_ratio = 0.0
    padded = model.classify(texts)
    one_by_one = [model.classify([t])[0] for t in texts]
    for got, a, b in zip(grouped, padded, one_by_one, strict=True):
        assert got[0] == a[0] == b[0]
        assert got[1] == pytest.approx(a[1], abs=1e-5) and got[1] == pytest.approx(b[1], abs=1e-5)
    model.unload()


def test_textblob_family_maps_polarity_to_the_contracts_labels(specs: dict[str, ModelSpec]) -> None:
    from textblob import TextBlob

    model = loaded(specs["textblob"])
    for text in ("what a lovely day", "this is terrible", "the table"):
        want = polarity_to_label(TextBlob(text).sentiment.polarity)
        assert model.classify([text]) == [want]
    assert polarity_to_label(0.0) == ("neutral", 0.5)
    assert polarity_to_label(0.5) == ("positive", 0.75)
    assert polarity_to_label(-1.0) == ("negative", 1.0)


def test_sklearn_family_equals_the_joblib_pipeline(specs: dict[str, ModelSpec]) -> None:
    import joblib
    import pandas as pd

    spec = specs["customer_segments"]
    model = loaded(spec)
    rows = [[10.0, 20.0, 1500.0, 36.0], [300.0, 1.0, 50.0, 3.0]]
    raw = joblib.load(spec.location)
    want = raw.predict(pd.DataFrame(rows, columns=raw.feature_names_in_)).tolist()
    assert model.predict(rows) == want and model.n_features == 4


@pytest.mark.parametrize("name", ["co2_prophet", "sunspots_arima"])
def test_forecasters_continue_their_series(specs: dict[str, ModelSpec], name: str) -> None:
    model = loaded(specs[name])
    out = model.forecast(4)
    assert len(out["ds"]) == len(out["yhat"]) == 4
    assert all(
        lo <= y <= hi
        for lo, y, hi in zip(out["yhat_lower"], out["yhat"], out["yhat_upper"], strict=True)
    )
    assert model.forecast(4) == out  # deterministic: same call, same answer
