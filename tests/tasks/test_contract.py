"""The public task contract, through a real `celery worker` (prefork, 2 processes) on real Redis,
with Redis and then RabbitMQ (BROKER_URL=amqp://..., a vhost of this run's own) as the broker:
the ``broker`` parameter (tests/conftest.py).

The client here knows only task names and JSON arguments (see WorkerProcess.app); results are
compared with the same library call made in-process on the same input, so the answers through
RabbitMQ are the same as through Redis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest

from harness import WorkerProcess, close_app
from shared.registry import ModelRegistry
from shared.repository import load_repository
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.integration
TIMEOUT = 60


def run(client: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    return client.send_task(name, args=list(args), kwargs=kwargs).get(timeout=TIMEOUT)


def fail(client: Any, name: str, *args: Any, **kwargs: Any) -> tuple[str, str]:
    """Send a task that must fail; return (exc_type, message) as any client would read them."""
    result = client.send_task(name, args=list(args), kwargs=kwargs)
    result.get(timeout=TIMEOUT, propagate=False)
    assert result.state == "FAILURE", result.result
    return stored_error(result)


def stored_error(result: Any) -> tuple[str, str]:
    """The failure as stored in Redis: the JSON any client (in any language) reads."""
    raw = result.backend.client.get(result.backend.get_key_for_task(result.id))
    exc = json.loads(raw)["result"]
    return exc["exc_type"], exc["exc_message"][0]


@pytest.fixture(scope="module")
def serving_worker(broker_serving_worker: WorkerProcess) -> WorkerProcess:
    """The project's real models served by one node, on the ``broker`` of this run."""
    return broker_serving_worker


@pytest.fixture(scope="module")
def client(serving_worker: WorkerProcess) -> Iterator[Any]:
    app = serving_worker.app()
    yield app
    close_app(app)


@pytest.fixture(scope="module")
def local() -> ModelRegistry:
    """The same models, loaded in this test process by the production code."""
    registry = ModelRegistry()
    registry.load_all(load_repository(REPOSITORY).active())
    return registry


def co2_monthly(n: int = 60) -> dict[str, list[Any]]:
    from statsmodels.datasets import co2

    s = co2.load_pandas().data["co2"].resample("MS").mean().interpolate().iloc[-n:]
    return {"ds": [d.date().isoformat() for d in s.index], "y": [float(v) for v in s]}


def close(a: list[float], b: list[float], tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b, strict=True)
    )


def test_sentiment_analyze_matches_the_pipeline_in_process(client: Any) -> None:
    from transformers import pipeline

    spec = load_repository(REPOSITORY).get("sentiment")
    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    for text in ("An absolute delight, I loved it.", "Dreadful, boring and far too long."):
        got = run(client, "sentiment.analyze", text)
        want = pipe(text)[0]
        assert set(got) == {"label", "score", "model", "version", "fallback"}
        assert got["label"] == want["label"].lower()
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert (got["model"], got["version"], got["fallback"]) == ("sentiment", spec.version, False)


def test_the_sentiment_model_tells_clear_positives_from_clear_negatives(client: Any) -> None:
    texts = ["This is wonderful, great and amazing.", "Terrible, awful and horrible."]
    labels = [r["label"] for r in run(client, "sentiment.analyze_batch", texts)]
    assert labels == ["positive", "negative"]


def test_analyze_batch_keeps_the_order_and_equals_single_calls(client: Any) -> None:
    texts = ["good", "bad movie", "I will never buy this again", "superb acting", "meh"]
    batch = run(client, "sentiment.analyze_batch", texts)
    singles = [run(client, "sentiment.analyze", t) for t in texts]
    assert [b["label"] for b in batch] == [s["label"] for s in singles]
    for b, s in zip(batch, singles, strict=True):
        assert b["score"] == pytest.approx(s["score"], abs=1e-4)


def test_a_second_classifier_is_served_beside_sentiment_by_the_repository_alone(
    client: Any,
) -> None:
    """models/subjectivity/ is a second transformers classifier (other labels): no task and no
    code names it; models.predict serves it, as the transformers pipeline would."""
    from transformers import pipeline

    spec = load_repository(REPOSITORY).get("subjectivity")
    pipe = pipeline("text-classification", model=spec.location, tokenizer=spec.location)
    texts = [
        "a lonely sailor sets out across the pacific to find his brother.",
        "a witty, moving and beautifully acted film.",
    ]
    got = client.send_task("models.predict", args=["subjectivity", texts]).get(timeout=30)
    assert got["model"] == "subjectivity" and got["version"] == "1.0.0" and not got["fallback"]
    assert [o["label"] for o in got["outputs"]] == ["objective", "subjective"]
    for out, want in zip(got["outputs"], pipe(texts), strict=True):
        assert out["label"] == want["label"] and out["score"] == pytest.approx(
            want["score"], abs=1e-5
        )
    # beside it, sentiment answers as before
    assert (
        client.send_task("sentiment.analyze", args=[texts[1]]).get(timeout=30)["label"]
        == "positive"
    )


def test_forecast_prophet_equals_prophet_fitted_in_process(client: Any) -> None:

    from shared.families.prophet_forecaster import fit_prophet

    series = co2_monthly()
    got = run(client, "forecast.prophet", series, 6, frequency="MS")
    want = fit_prophet(series["ds"], series["y"], 6, "MS")
    assert got["ds"] == want["ds"] and got["ds"][0][:10] > series["ds"][-1]
    assert close(got["yhat"], want["yhat"], 1e-6)
    assert close(got["yhat_lower"], want["yhat_lower"], 1e-6)
    assert got["model"] == "prophet" and got["version"]
    assert all(
        lo <= y <= hi
        for lo, y, hi in zip(got["yhat_lower"], got["yhat"], got["yhat_upper"], strict=True)
    )


def test_forecast_arima_equals_statsmodels_in_process(client: Any) -> None:
    import pandas as pd
    from statsmodels.tsa.arima.model import ARIMA

    series = co2_monthly(48)
    got = run(client, "forecast.arima", series, 4, order=[1, 1, 1])
    y = pd.Series(series["y"], index=pd.DatetimeIndex(pd.to_datetime(series["ds"]), freq="MS"))
    frame = ARIMA(y, order=(1, 1, 1)).fit().get_forecast(4).summary_frame(alpha=0.2)
    assert close(got["yhat"], list(frame["mean"]), 1e-6)
    assert got["ds"] == [d.isoformat() for d in frame.index.to_pydatetime()]
    undated = run(client, "forecast.arima", {"y": series["y"]}, 2, order=[1, 0, 0])
    assert undated["ds"] is None and len(undated["yhat"]) == 2


@pytest.mark.parametrize("name", ["co2_prophet", "sunspots_arima"])
def test_forecast_predict_serves_the_prefitted_model(
    client: Any, local: ModelRegistry, name: str
) -> None:
    got = run(client, "forecast.predict", name, 5)
    want = local.get(name).forecast(5)  # type: ignore[attr-defined]
    assert got["ds"] == want["ds"] and close(got["yhat"], want["yhat"], 1e-6)
    assert got["model"] == name and got["version"] == local.metadata(name).version


def test_clustering_assign_equals_the_pipeline_in_process(
    client: Any, local: ModelRegistry
) -> None:
    model = local.get("customer_segments")
    width = model.n_features  # type: ignore[attr-defined]
    rows = [[float(i * j % 17) for j in range(width)] for i in range(1, 30)]
    got = run(client, "clustering.assign", rows)
    assert got == {
        "labels": model.labels(rows),  # type: ignore[attr-defined]
        "model": "customer_segments",
        "version": local.metadata("customer_segments").version,
    }


def test_clustering_fit_equals_kmeans_in_process(client: Any) -> None:
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_iris

    rows = load_iris().data.tolist()
    got = run(client, "clustering.fit", rows, 3)
    km = KMeans(n_clusters=3, n_init=10, random_state=0).fit(rows)
    assert got["labels"] == km.labels_.tolist()
    assert got["inertia"] == pytest.approx(km.inertia_)
    assert len(got["centers"]) == 3 and len(got["centers"][0]) == 4


def test_publish_state_returns_this_process_snapshot_and_writes_it(
    client: Any, serving_worker: WorkerProcess
) -> None:
    snap = run(client, "control.publish_state")
    assert snap["ready"] and snap["node"] == serving_worker.node
    assert snap["pid"] in serving_worker.children_pids()
    assert {"sentiment", "customer_segments", "co2_prophet", "sunspots_arima"} <= set(
        snap["models"]
    )
    stored = {s["pid"]: s for s in serving_worker.snapshots()}
    assert snap["pid"] in stored and stored[snap["pid"]]["models"]["sentiment"]["status"] == "READY"


BAD = [
    ("sentiment.analyze", [""], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", [123], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", ["x" * 10_001], {}, "InvalidInput", "text:"),
    ("sentiment.analyze_batch", [["fine", None]], {}, "InvalidInput", "texts[1]:"),
    (
        "forecast.prophet",
        [{"ds": ["2024-01-01"] * 3, "y": [1, 2, 3]}, 3],
        {},
        "InvalidInput",
        "series.y:",
    ),
    (
        "forecast.prophet",
        [{"ds": [f"2024-01-{d:02d}" for d in range(1, 13)], "y": [1.0] * 11 + [float("nan")]}, 3],
        {},
        "InvalidInput",
        "series.y[11]:",
    ),
    (
        "forecast.prophet",
        [{"ds": [f"2024-01-{d:02d}" for d in range(1, 13)], "y": [1.0] * 11}, 3],
        {},
        "InvalidInput",
        "series.ds:",
    ),
    (
        "forecast.prophet",
        [{"ds": ["2024-13-45"] + [f"2024-01-{d:02d}" for d in range(2, 13)], "y": [1.0] * 12}, 3],
        {},
        "InvalidInput",
        "series.ds[0]:",
    ),
    (
        "forecast.prophet",
        [{"ds": [f"2024-01-{d:02d}" for d in range(1, 13)], "y": [1.0] * 12}, 0],
        {},
        "InvalidInput",
        "horizon:",
    ),
    ("forecast.arima", [{"y": [1.0] * 12}, 100_000], {}, "InvalidInput", "horizon:"),
    ("forecast.arima", [{"y": [1.0] * 12}, 3], {"order": [1, 2]}, "InvalidInput", "order:"),
    ("forecast.predict", ["no_such_model", 3], {}, "ModelNotFound", "model 'no_such_model'"),
    ("forecast.predict", ["customer_segments", 3], {}, "InvalidInput", "model:"),
    ("clustering.assign", [[[1, 2], [1]]], {}, "InvalidInput", "rows[1]:"),
    ("clustering.assign", [[[1.0, 2.0]]], {}, "InvalidInput", "rows[0]:"),
    (
        "clustering.assign",
        [[[1.0, 2.0, 3.0, 4.0]]],
        {"model": "ghost"},
        "ModelNotFound",
        "model 'ghost'",
    ),
    ("clustering.fit", [[[1.0], [2.0]], 5], {}, "InvalidInput", "n_clusters:"),
]


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "exc_type", "starts"), BAD, ids=[f"{b[0]}-{b[4]}" for b in BAD]
)
def test_bad_input_fails_with_a_typed_error_naming_the_field(
    client: Any, task: str, args: list[Any], kwargs: dict[str, Any], exc_type: str, starts: str
) -> None:
    got_type, message = fail(client, task, *args, **kwargs)
    assert got_type == exc_type and message.startswith(starts), message


def test_the_worker_stays_healthy_after_bad_input(
    client: Any, serving_worker: WorkerProcess
) -> None:
    pids = set(serving_worker.children_pids())
    for task, args, kwargs, *_ in BAD:
        client.send_task(task, args=args, kwargs=kwargs).get(timeout=TIMEOUT, propagate=False)
    assert run(client, "sentiment.analyze", "still working?")["label"] in {"positive", "negative"}
    assert set(serving_worker.children_pids()) == pids  # no pool process died
    assert all(s["ready"] for s in serving_worker.snapshots())


def test_results_are_plain_json_in_redis(client: Any, serving_worker: WorkerProcess) -> None:
    import json

    result = client.send_task("clustering.fit", args=[[[0.0], [1.0], [9.0]], 2])
    result.get(timeout=TIMEOUT)
    raw = serving_worker.client.get(f"celery-task-meta-{result.id}")
    stored = json.loads(raw)
    assert stored["status"] == "SUCCESS" and len(stored["result"]["labels"]) == 3


def test_the_python_client_gets_the_same_answers_as_a_client_of_task_names_and_json(
    client: Any, serving_worker: WorkerProcess
) -> None:
    """ModelClient with this run's broker (BROKER_URL when it is RabbitMQ) and Redis."""
    from workers.client import ModelClient

    with ModelClient(
        serving_worker.redis_url,
        broker_url=serving_worker.broker_url,
        queue=serving_worker.queue,
        key_prefix=serving_worker.prefix,
    ) as typed:
        text = "Wonderful service, would come again."
        assert typed.analyze(text).model_dump() == run(client, "sentiment.analyze", text)
        rows = [[0.1, 0.2, 0.3, 0.4]]
        got = typed.assign(rows).model_dump()
        assert got == run(client, "clustering.assign", rows)
