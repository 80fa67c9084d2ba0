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
