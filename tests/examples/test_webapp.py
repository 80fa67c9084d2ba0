"""examples/webapp.py through FastAPI's TestClient, against a real prefork worker on real Redis.

The app under test is built exactly as a deployment would build it: from a Redis URL, a key
prefix and a queue name. It talks to the workers through workers.client.AsyncModelClient.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from examples.webapp import create_app
from harness import ROOT, WorkerProcess
from workers.embedded import free_port

pytestmark = pytest.mark.integration
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def web(serving_worker: WorkerProcess) -> Iterator[TestClient]:
    app = create_app(
        redis_url=serving_worker.redis_url,
        key_prefix=serving_worker.prefix,
        queue=serving_worker.queue,
    )
    with TestClient(app) as client:
        yield client


def enqueue(web: TestClient, path: str, body: dict[str, Any]) -> str:
    response = web.post(path, json=body)
    assert response.status_code == 202, response.text
    assert set(response.json()) == {"task_id"}
    task_id: str = response.json()["task_id"]
    return task_id


def wait_done(web: TestClient, task_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Poll GET /tasks/{id} until SUCCESS or FAILURE; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        response = web.get(f"/tasks/{task_id}")
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        assert view["task_id"] == task_id
        if view["state"] in {"SUCCESS", "FAILURE"}:
            return view
        assert set(view) == {"task_id", "state"} and view["state"] in {"PENDING", "STARTED"}
        seen.append(view["state"])
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} not done after {timeout:g} s (states: {seen[-3:]})")


def co2_monthly(n: int = 36) -> dict[str, list[Any]]:
    from statsmodels.datasets import co2

    s = co2.load_pandas().data["co2"].resample("MS").mean().interpolate().iloc[-n:]
    return {"ds": [d.date().isoformat() for d in s.index], "y": [float(v) for v in s]}


def test_sentiment_job_is_enqueued_then_polled_to_its_result(web: TestClient) -> None:
    task_id = enqueue(web, "/sentiment", {"text": "An absolute delight, I loved every minute."})
    view = wait_done(web, task_id)
    assert view["state"] == "SUCCESS" and set(view) == {"task_id", "state", "result"}
    result = view["result"]
    assert set(result) == {"label", "score", "model", "version", "fallback"}
    assert result["label"] in {"positive", "negative"}
    assert 0.0 <= result["score"] <= 1.0
    assert result["model"] == "sentiment" and result["version"] and result["fallback"] is False


def test_sentiment_batch_labels_each_text_in_order(web: TestClient) -> None:
    texts = ["This is wonderful, great and amazing.", "Terrible, awful and horrible."]
    view = wait_done(web, enqueue(web, "/sentiment/batch", {"texts": texts}))
    assert view["state"] == "SUCCESS"
    assert [r["label"] for r in view["result"]] == ["positive", "negative"]


def test_prophet_forecast_returns_horizon_values(web: TestClient) -> None:
    series = co2_monthly()
    body = {"series": series, "horizon": 6, "frequency": "MS"}
    view = wait_done(web, enqueue(web, "/forecast", body))
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["model"] == "prophet" and result["version"]
    assert len(result["ds"]) == len(result["yhat"]) == 6
    assert result["ds"][0] > series["ds"][-1]  # the forecast starts after the series
    assert all(
        lo <= y <= hi
        for lo, y, hi in zip(
            result["yhat_lower"], result["yhat"], result["yhat_upper"], strict=True
        )
    )


def test_arima_forecast_with_an_order(web: TestClient) -> None:
    body = {"series": co2_monthly(), "horizon": 4, "method": "arima", "order": [1, 1, 1]}
    view = wait_done(web, enqueue(web, "/forecast", body))
    assert view["state"] == "SUCCESS", view
    assert view["result"]["model"] == "arima" and len(view["result"]["yhat"]) == 4


def test_bad_input_ends_in_failure_with_the_error_type_and_message(web: TestClient) -> None:
    view = wait_done(web, enqueue(web, "/sentiment", {"text": ""}))
    assert view["state"] == "FAILURE" and set(view) == {"task_id", "state", "error"}
    assert view["error"]["type"] == "InvalidInput"
    assert view["error"]["message"].startswith("text:"), view["error"]


def test_a_failure_of_a_type_outside_shared_errors_keeps_its_exc_type(
    web: TestClient, client: Celery
) -> None:
    task_id = str(uuid.uuid4())
    client.backend.mark_as_failure(task_id, ValueError("a bug in a model"))  # as a worker does
    view = web.get(f"/tasks/{task_id}").json()
    assert view == {
        "task_id": task_id,
        "state": "FAILURE",
        "error": {"type": "ValueError", "message": "a bug in a model"},
    }


def test_a_body_of_the_wrong_shape_is_rejected_before_anything_is_enqueued(
    web: TestClient,
) -> None:
    assert web.post("/sentiment", json={"txt": "hello"}).status_code == 422
    assert web.post("/forecast", json={"series": {"y": [1.0]}, "method": "lstm"}).status_code == 422


def test_an_unknown_task_id_is_pending(web: TestClient) -> None:
    task_id = str(uuid.uuid4())
    assert web.get(f"/tasks/{task_id}").json() == {"task_id": task_id, "state": "PENDING"}


def test_sync_sentiment_returns_the_result_or_422(web: TestClient) -> None:
    ok = web.post("/sentiment/sync", params={"timeout": TIMEOUT}, json={"text": "superb acting"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["label"] in {"positive", "negative"}
    bad = web.post("/sentiment/sync", params={"timeout": TIMEOUT}, json={"text": ""})
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"]["type"] == "InvalidInput"
    assert bad.json()["detail"]["message"].startswith("text:")


def test_predict_any_model_returns_the_prediction_404_or_422(web: TestClient) -> None:
    ok = web.post(
        "/models/sentiment/predict", params={"timeout": TIMEOUT}, json={"inputs": "superb acting"}
    )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert set(body) == {"model", "version", "fallback", "outputs"}
    assert body["model"] == "sentiment" and body["outputs"]["label"] in {"positive", "negative"}
    rows = web.post(
        "/models/customer_segments/predict",
        params={"timeout": TIMEOUT},
        json={"inputs": [[12.0, 24.0, 1800.0, 40.0]], "version": "1.0.0"},
    )
    assert rows.status_code == 200, rows.text
    assert len(rows.json()["outputs"]["labels"]) == 1
    unknown = web.post("/models/ghost/predict", params={"timeout": TIMEOUT}, json={"inputs": "x"})
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["detail"]["type"] == "ModelNotFound"
    bad = web.post(
        "/models/customer_segments/predict", params={"timeout": TIMEOUT}, json={"inputs": [[1.0]]}
    )
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"] == {
        "type": "InvalidInput",
        "message": "inputs[0]: has 1 values, the model takes 4",
    }


def test_sync_sentiment_times_out_with_504_when_no_worker_listens(
    serving_worker: WorkerProcess,
) -> None:
    app = create_app(
        redis_url=serving_worker.redis_url,
        key_prefix=serving_worker.prefix,
        queue=f"nobody-listens-{uuid.uuid4().hex[:8]}",
    )
    with TestClient(app) as client:
        started = time.monotonic()
        response = client.post("/sentiment/sync", params={"timeout": 0.5}, json={"text": "hi"})
        assert response.status_code == 504, response.text
        assert response.json()["detail"]["state"] == "PENDING"
        assert time.monotonic() - started < 10


def test_enqueued_jobs_leave_no_result_subscription_behind(
    web: TestClient, serving_worker: WorkerProcess
) -> None:
    ids = [enqueue(web, "/sentiment", {"text": f"fine {i}"}) for i in range(3)]
    for task_id in ids:
        assert wait_done(web, task_id)["state"] == "SUCCESS"
    channels = set(serving_worker.client.pubsub_channels("celery-task-meta-*"))
    assert not channels & {f"celery-task-meta-{i}".encode() for i in ids}


def test_health_is_ready_with_both_pool_processes(
    web: TestClient, serving_worker: WorkerProcess
) -> None:
    response = web.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True and body["processes"] == serving_worker.concurrency == 2
    assert {"sentiment", "customer_segments", "co2_prophet", "sunspots_arima"} <= set(
        body["models"]
    )
    sentiment = body["models"]["sentiment"]
    assert sentiment["ready_in"] == 2 and sum(sentiment["versions"].values()) == 2


def test_health_is_503_when_no_process_published_under_the_prefix(
    serving_worker: WorkerProcess,
) -> None:
    app = create_app(redis_url=serving_worker.redis_url, key_prefix="nobody-here", queue="x")
    with TestClient(app) as client:
        response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False and body["processes"] == 0
    assert "nobody-here:proc:*" in str(body["not_ready"])


def test_health_is_503_quickly_when_redis_is_unreachable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(redis_url=url, key_prefix="x", queue="x")) as client:
        started = time.monotonic()
        response = client.get("/health")
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["ready"] is False
        assert "cannot reach Redis" in response.json()["error"]
        assert "Traceback" not in response.text
        assert elapsed < 5
        enqueue_failed = client.post("/sentiment", json={"text": "hi"})
        assert enqueue_failed.status_code == 503
        assert enqueue_failed.json()["detail"].startswith("cannot enqueue sentiment.analyze")


def test_importing_the_module_opens_no_connection() -> None:
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise AssertionError('network at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import examples.webapp as w\n"
        "print([getattr(r, 'path', '') for r in w.app.routes])\n"
    )
    env = {**os.environ, "MODELWORKERS_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "/health" in done.stdout and "/tasks/{task_id}" in done.stdout
