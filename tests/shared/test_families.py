"""Each model family loads the project's real artifact and answers like its library does."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ArtifactError
from shared.families import family_class
from shared.families.textblob_sentiment import polarity_to_label
from shared.manifest import ModelSpec, artifact_sha256
from shared.repository import load_repository
from tests.conftest import REPOSITORY


@pytest.fixture(scope="module")
def specs() -> dict[str, ModelSpec]:
    return {s.name: s for s in load_repository(REPOSITORY).active()}


def loaded(spec: ModelSpec, backend: str | None = None):  # type: ignore[no-untyped-def]
    """``backend``: the transformers option (torch or onnx); None: as the model file says."""
    if backend is not None:
        spec = spec.model_copy(update={"options": {**spec.options, "backend": backend}})
    model = family_class(spec.family)(spec, device="cpu")
    model.load()
    return model


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_transformers_family_equals_the_transformers_pipeline(
    specs: dict[str, ModelSpec], backend: str
) -> None:
    from transformers import pipeline

    spec = specs["sentiment"]
    model = loaded(spec, backend)
    assert model.backend == backend
    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    texts = ["a joyous, beautiful film", "boring and far too long", "ok"]
    for (label, score), want in zip(model.classify(texts), pipe(texts), strict=True):
        assert label == want["label"].lower() and score == pytest.approx(want["score"], abs=1e-5)
    assert model.describe()["labels"] == ["negative", "positive"]
    model.unload()


def test_small_forward_passes_run_on_one_torch_thread(specs: dict[str, ModelSpec]) -> None:
    """TORCH_SMALL_FORWARD_MFLOP: a one-text pass runs on one torch thread, a large batch on all
    of the process's threads; the process's count is back afterwards, also when the pass fails;
    0 turns it off."""
    import torch

    model = loaded(specs["sentiment"], "torch")
    seen: list[int] = []
    hook = model._model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert model.small_forward_mflop > 0 and model.flop_per_token > 0  # CPU default
        one = model.classify(["a joyous, beautiful film"])
        big_batch = ["a long review of a film that goes on and on " * 4] * 16
        model.classify(big_batch)
        assert seen == [1, 2] and torch.get_num_threads() == 2
        assert model.forward_threads(10) == 1
        assert model.forward_threads(10_000) == 2

        def fail(*_: object) -> None:
            raise RuntimeError("boom")

        failing = model._model.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="boom"):
            model.classify(["ok"])
        failing.remove()
        assert torch.get_num_threads() == 2

        seen.clear()
        model.small_forward_mflop = 0.0
        two = model.classify(["a joyous, beautiful film"])
        assert seen == [2]
        assert two[0][0] == one[0][0] and two[0][1] == pytest.approx(one[0][1], abs=1e-5)
    finally:
        hook.remove()
        torch.set_num_threads(before)
        model.unload()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_length_sorted_forward_passes_answer_like_one_padded_batch(
    specs: dict[str, ModelSpec], backend: str
) -> None:
    """BATCH_PAD_RATIO splits a mixed-length batch into tighter forward passes (CPU); the
    answers, in the caller's order, are those of one padded pass and of one text at a time."""
    model = loaded(specs["sentiment"], backend)
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
    assert model.labels(rows) == want and model.predict(rows) == {"labels": want}
    assert model.n_features == 4


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


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_forward_passes_run_side_by_side_in_threads_each_on_its_own_torch_threads(
    specs: dict[str, ModelSpec], backend: str
) -> None:
    """The threads pool's lanes: classify from two threads at once answers as one at a time
    does (on ONNX Runtime: two runs of one session at once), and torch threads set in one
    thread (a lane's) leave the others' count alone (OpenMP keeps it per calling thread, which
    the lanes rely on)."""
    import os
    import threading

    import torch

    model = loaded(specs["sentiment"], backend)
    texts = [f"{w} film, {'great' if i % 2 else 'awful'} acting" for i, w in enumerate("abcdefgh")]
    alone = model.classify(texts)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got: dict[int, list[tuple[str, float]]] = {}
        lane_threads: dict[int, int] = {}
        start = threading.Barrier(2, timeout=10)

        def lane(i: int) -> None:
            torch.set_num_threads(1)
            lane_threads[i] = torch.get_num_threads()
            start.wait()
            for _ in range(5):
                got[i] = model.classify(texts)

        threads = [threading.Thread(target=lane, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert lane_threads == {0: 1, 1: 1}
        for answers in got.values():
            assert [label for label, _ in answers] == [label for label, _ in alone]
            for (_, score), (_, want) in zip(answers, alone, strict=True):
                assert score == pytest.approx(want, abs=1e-5)
        if len(os.sched_getaffinity(0)) >= 2:
            assert torch.get_num_threads() == 2  # this thread's count did not follow the lanes
    finally:
        torch.set_num_threads(before)
        model.unload()


@pytest.mark.parametrize("family", ["sklearn", "arima"])
def test_an_artifact_that_does_not_unpickle_fails_naming_the_model_and_file(
    tmp_path: Path, family: str
) -> None:
    """Its hash matches (it is the file the model file lists), its content is not a model."""
    artifact = tmp_path / "2.0.0.joblib"
    artifact.write_bytes(b"this is not a joblib file")
    spec = ModelSpec(
        name="broken",
        family=family,
        path=artifact.name,
        sha256=artifact_sha256(artifact),
        location=str(artifact),
    )
    model = family_class(family)(spec)
    with pytest.raises(ArtifactError, match=r"'broken': 2\.0\.0\.joblib could not be read as a"):
        model.load()


def test_sklearn_deep_size_counts_each_buffer_once_and_gives_up_on_huge_graphs() -> None:
    import numpy as np

    from shared.families.sklearn_pipeline import deep_size

    x = np.zeros((1000, 8))
    shared_view = {"a": x, "b": x[10:], "c": [x.T, "label"]}
    size = deep_size(shared_view)
    assert size is not None and x.nbytes <= size < x.nbytes + 4096
    assert deep_size([[i] for i in range(50)], limit=20) is None
