"""workers.client against real workers on a private Redis: typed results equal to what the tasks
answer a bare Celery client, typed errors, bounded waits, per-model routing, and an asyncio
client that never blocks its event loop."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from harness import ROOT, WorkerProcess, build_kmeans, wait_for
from shared.errors import (
    InvalidInput,
    InvalidMessage,
    ModelNotFound,
    ModelWorkersError,
    PoisonTask,
    RedisUnavailable,
    ResultTimeout,
    TaskFailed,
)
from shared.repository import ModelFile, VersionEntry, write_model_file
from shared.results import Clusters, Forecast, KMeansFit, Prediction, Sentiment
from shared.settings import get_settings
from workers.client import AsyncModelClient, ModelClient
from workers.embedded import free_port

pytestmark = pytest.mark.integration
TIMEOUT = 60.0

MONTHS = [f"{2024 + i // 12}-{i % 12 + 1:02d}-01" for i in range(24)]
Y = [100, 102, 104, 106, 108, 115, 117, 119, 116, 118, 120, 122]
Y += [124, 126, 128, 130, 132, 139, 141, 143, 140, 142, 144, 146]
SERIES = {"ds": MONTHS, "y": [float(v) for v in Y]}
ROWS = [[12.0, 24.0, 1800.0, 40.0], [200.0, 2.0, 90.0, 6.0], [45.0, 8.0, 420.0, 18.0]]
FIT_ROWS = [[1.0, 1.0], [1.2, 0.8], [0.9, 1.1], [8.0, 8.0], [8.2, 7.9], [7.8, 8.1]]
TEXT = "An absolute delight, I loved it."


@pytest.fixture(scope="module")
def mc(serving_worker: WorkerProcess) -> Iterator[ModelClient]:
    client = ModelClient(
        serving_worker.redis_url,
        queue=serving_worker.queue,
        key_prefix=serving_worker.prefix,
        timeout=TIMEOUT,
    )
    with client:
        yield client


def bare(app: Celery, name: str, *args: Any, **kwargs: Any) -> Any:
    """What the task answers a bare Celery client (JSON, the worker's queue)."""
    return app.send_task(name, args=list(args), kwargs=kwargs).get(timeout=TIMEOUT)


# ---- typed results ---------------------------------------------------------------------------
CASES: list[tuple[str, Callable[[ModelClient], Any], str, tuple[Any, ...], dict[str, Any]]] = [
    ("analyze", lambda c: c.analyze(TEXT), "sentiment.analyze", (TEXT,), {}),
    (
        "analyze_batch",
        lambda c: c.analyze_batch(["Great and amazing.", "Awful.", "It arrived on Tuesday."]),
        "sentiment.analyze_batch",
        (["Great and amazing.", "Awful.", "It arrived on Tuesday."],),
        {},
    ),
    (
        "forecast_prophet",
        lambda c: c.forecast_prophet(SERIES, 3, "MS"),
        "forecast.prophet",
        (SERIES, 3),
        {"frequency": "MS"},
    ),
    (
        "forecast_arima",
        lambda c: c.forecast_arima(SERIES, 3, order=(1, 1, 0)),
        "forecast.arima",
        (SERIES, 3),
        {"order": [1, 1, 0]},
    ),
    (
        "forecast_arima_without_dates",
        lambda c: c.forecast_arima({"y": SERIES["y"]}, 2, (1, 0, 0)),
        "forecast.arima",
        ({"y": SERIES["y"]}, 2),
        {"order": [1, 0, 0]},
    ),
    (
        "forecast_predict",
        lambda c: c.forecast_predict("co2_prophet", 3),
        "forecast.predict",
        ("co2_prophet", 3),
        {},
    ),
    ("assign", lambda c: c.assign(ROWS), "clustering.assign", (ROWS,), {}),
    ("fit", lambda c: c.fit(FIT_ROWS, 2), "clustering.fit", (FIT_ROWS, 2), {}),
    ("predict", lambda c: c.predict("sentiment", TEXT), "models.predict", ("sentiment", TEXT), {}),
    (
        "predict_rows",
        lambda c: c.predict("customer_segments", ROWS, version="1.0.0"),
        "models.predict",
        ("customer_segments", ROWS),
        {"version": "1.0.0"},
    ),
]
TYPES = {
    "analyze": Sentiment,
    "forecast_prophet": Forecast,
    "forecast_arima": Forecast,
    "forecast_arima_without_dates": Forecast,
    "forecast_predict": Forecast,
    "assign": Clusters,
    "fit": KMeansFit,
    "predict": Prediction,
    "predict_rows": Prediction,
}


@pytest.mark.parametrize(
    ("method", "typed", "task", "args", "kwargs"), CASES, ids=[c[0] for c in CASES]
)
def test_each_typed_method_returns_what_the_task_answers_a_bare_celery_client(
    mc: ModelClient,
    client: Celery,
    method: str,
    typed: Callable[[ModelClient], Any],
    task: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    result = typed(mc)
    expected = bare(client, task, *args, **kwargs)
    if method == "analyze_batch":
        assert isinstance(result, list) and all(isinstance(r, Sentiment) for r in result)
        assert [r.model_dump() for r in result] == expected
        assert [r.label for r in result][:2] == ["positive", "negative"]
        return
    assert type(result) is TYPES[method]
    assert result.model_dump() == expected
    if method == "forecast_arima_without_dates":
        assert result.ds is None and len(result.yhat) == 2


def test_predict_sentiment_equals_analyze(mc: ModelClient) -> None:
    analyzed = mc.analyze(TEXT)
    predicted = mc.predict("sentiment", TEXT)
    assert predicted.outputs == {"label": analyzed.label, "score": analyzed.score}
    assert (predicted.model, predicted.version, predicted.fallback) == (
        analyzed.model,
        analyzed.version,
        analyzed.fallback,
    )


def test_send_and_result_are_the_untyped_path(mc: ModelClient) -> None:
    task_id = mc.send("clustering.assign", ROWS, model="customer_segments")
    uuid.UUID(task_id)
    result = mc.result(task_id, timeout=TIMEOUT)
    assert set(result) == {"labels", "model", "version"} and len(result["labels"]) == 3
    assert mc.result(task_id, timeout=0) == result  # a finished task is read at once


# ---- errors ----------------------------------------------------------------------------------
def test_bad_input_raises_invalid_input_naming_the_field(mc: ModelClient) -> None:
    with pytest.raises(InvalidInput) as empty:
        mc.analyze("")
    assert str(empty.value).startswith("text:") and empty.value.field == "text"
    with pytest.raises(InvalidInput, match=r"^horizon: must be between 1 and 1000 \(got 0\)"):
        mc.forecast_prophet(SERIES, 0, "MS")
    with pytest.raises(InvalidInput, match=r"^rows\[1\]\[1\]: "):
        mc.assign([[1.0, 2.0, 3.0, 4.0], [1.0, "x", 3.0, 4.0]])  # type: ignore[list-item]


def test_an_unknown_model_raises_model_not_found(mc: ModelClient) -> None:
    with pytest.raises(ModelNotFound, match="'no_such_model' is not in the manifest"):
        mc.predict("no_such_model", "hello")
    with pytest.raises(ModelNotFound, match=r"known models: .*co2_prophet"):
        mc.forecast_predict("ghost", 3)


def test_stored_failures_raise_the_error_named_by_exc_type_else_task_failed(
    mc: ModelClient, client: Celery
) -> None:
    """Failures written by Celery's own result backend, as a worker writes them."""
    stored = {
        InvalidMessage: InvalidMessage("args nested 901 levels deep, deeper than the limit"),
        PoisonTask: PoisonTask("sentiment.analyze", "abc", 3),
    }
    for cls, exc in stored.items():
        task_id = str(uuid.uuid4())
        client.backend.mark_as_failure(task_id, exc)
        with pytest.raises(cls) as raised:
            mc.result(task_id, timeout=5)
        assert str(raised.value) == str(exc)
    task_id = str(uuid.uuid4())
    client.backend.mark_as_failure(task_id, ValueError("a bug in a model"))
    with pytest.raises(TaskFailed) as failed:
        mc.result(task_id, timeout=5)
    assert failed.value.exc_type == "ValueError" and failed.value.message == "a bug in a model"
    assert failed.value.task_id == task_id and str(failed.value) == "ValueError: a bug in a model"
    assert isinstance(failed.value, ModelWorkersError)
    task_id = str(uuid.uuid4())
    client.backend.mark_as_revoked(task_id, "revoked")
    with pytest.raises(TaskFailed) as revoked:
        mc.result(task_id, timeout=5)
    assert revoked.value.exc_type == "TaskRevokedError"


def test_no_result_in_time_raises_result_timeout_naming_the_task(
    serving_worker: WorkerProcess,
) -> None:
    nobody = f"nobody-listens-{uuid.uuid4().hex[:8]}"
    with ModelClient(serving_worker.redis_url, queue=nobody, key_prefix=serving_worker.prefix) as c:
        started = time.monotonic()
        with pytest.raises(ResultTimeout) as timed_out:
            c.analyze("hello", timeout=0.5)
        waited = time.monotonic() - started
        assert 0.5 <= waited < 5
        assert isinstance(timed_out.value, TimeoutError)
        assert timed_out.value.state == "PENDING" and timed_out.value.seconds == 0.5
        assert timed_out.value.task_id in str(timed_out.value) and "0.5 s" in str(timed_out.value)
        assert serving_worker.client.llen(nobody) == 1  # it waits in the queue it was sent to
        with pytest.raises(ResultTimeout):
            c.result(timed_out.value.task_id, timeout=0)  # a poll: one read, no wait
    serving_worker.client.delete(nobody)


def test_a_tiny_timeout_on_a_live_worker_raises_result_timeout(mc: ModelClient) -> None:
    with pytest.raises(ResultTimeout) as timed_out:
        mc.forecast_prophet(SERIES, 3, "MS", timeout=0.001)
    assert mc.result(timed_out.value.task_id, timeout=TIMEOUT)["model"] == "prophet"  # ran


def test_a_client_from_the_environment_sends_to_task_queue_without_naming_a_queue(
    serving_worker: WorkerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELWORKERS_REDIS_URL", serving_worker.redis_url)
    monkeypatch.setenv("MODELWORKERS_TASK_QUEUE", serving_worker.queue)
    monkeypatch.setenv("MODELWORKERS_KEY_PREFIX", serving_worker.prefix)
    get_settings.cache_clear()
    try:
        with ModelClient() as c:
            assert c.app.conf.task_default_queue == serving_worker.queue != "celery"
            assert c.key_prefix == serving_worker.prefix
            assert c.analyze("Superb acting.", timeout=TIMEOUT).model == "sentiment"
    finally:
        get_settings.cache_clear()


def test_waits_leave_no_result_subscription_behind(
    mc: ModelClient, serving_worker: WorkerProcess
) -> None:
    ids = [mc.send("sentiment.analyze", f"fine {i}") for i in range(3)]
    assert all(mc.result(i, timeout=TIMEOUT)["model"] == "sentiment" for i in ids)
    mine = {f"celery-task-meta-{i}".encode() for i in ids}

    def left() -> set[bytes]:
        return set(serving_worker.client.pubsub_channels("celery-task-meta-*")) & mine

    # A wait's subscription ends with its connection, which Redis sees close a moment later.
    wait_for(lambda: not left(), 5, "the waits' subscriptions to end")


def test_redis_unreachable_raises_redis_unavailable_quickly() -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    with ModelClient(url, queue="x", key_prefix="x") as c:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as sending:
            c.analyze("hi")
        assert time.monotonic() - started < 10
        assert str(sending.value).startswith("cannot enqueue sentiment.analyze: ")
        assert isinstance(sending.value, ConnectionError)
        with pytest.raises(RedisUnavailable, match="cannot read the result of task abc"):
            c.result("abc", timeout=1)
        with pytest.raises(RedisUnavailable, match="cannot reach Redis"):
            c.snapshots()
        assert "s3cret" not in str(sending.value) + repr(c)


# ---- routing ---------------------------------------------------------------------------------
def kmeans_model(repo: Path, name: str, queue: str = "") -> None:
    folder = repo / name
    build_kmeans(folder / "1.joblib", n_features=3, k=3)
    digest = hashlib.sha256((folder / "1.joblib").read_bytes()).hexdigest()
    model = ModelFile(
        family="sklearn",
        queue=queue,
        versions=[VersionEntry(version="1", path="1.joblib", sha256=digest)],
    )
    write_model_file(folder, model)


def test_a_model_with_a_queue_of_its_own_is_sent_there_and_served_only_there(
    start_worker: Callable[..., WorkerProcess], redis_url: str, tmp_path: Path
) -> None:
    prefix = f"mwtest-{uuid.uuid4().hex[:8]}"
    gpu = f"{prefix}-gpu"
    repo = tmp_path / "repo"
    kmeans_model(repo, "edge_segments", queue=gpu)
    kmeans_model(repo, "plain_segments")
    env = {"MODELWORKERS_MODEL_REPOSITORY": str(repo)}
    # Both nodes share the registry prefix and TASK_QUEUE (= prefix); the second consumes only
    # the gpu queue (its -Q comes last on the command line, and the last -Q is the one used).
    default = start_worker(prefix=prefix, node=f"default-{prefix}@testhost", concurrency=1, env=env)
    gpu_node = start_worker(
        prefix=prefix,
        node=f"gpu-{prefix}@testhost",
        concurrency=1,
        env=env,
        extra_args=["-Q", gpu],
    )
    default_snap = default.wait_ready(1, timeout=120)[0]
    gpu_snap = gpu_node.wait_ready(1, timeout=120)[0]
    assert set(default_snap["models"]) == {"plain_segments"}  # never loads the gpu model
    assert set(gpu_snap["models"]) == {"edge_segments"}
    assert gpu_snap["models"]["edge_segments"]["queue"] == gpu

    rows = [[0.1, 0.2, 0.3], [3.0, -1.0, 2.0]]
    with ModelClient(redis_url, queue=prefix, key_prefix=prefix, timeout=TIMEOUT) as c:
        assert c.queue_for("edge_segments") == gpu and c.queue_for("plain_segments") == prefix
        assert c.routes() == {"edge_segments": gpu, "plain_segments": prefix}
        sent = [c.send("models.predict", "edge_segments", rows)]
        sent.append(c.send("clustering.assign", rows, model="edge_segments"))
        assert Prediction.model_validate(c.result(sent[0])).model == "edge_segments"
        assert (
            Clusters.model_validate(c.result(sent[1])).labels
            == c.result(sent[0])["outputs"]["labels"]
        )
        typed = c.predict("edge_segments", rows)
        assert typed.model == "edge_segments" and len(typed.outputs["labels"]) == 2
        plain = c.send("models.predict", "plain_segments", rows)
        assert c.result(plain)["model"] == "plain_segments"

        wait_for(lambda: all(i in gpu_node.log() for i in sent), 10, "the gpu node's log")
        for task_id in sent:
            assert f"[{task_id}] received" in gpu_node.log()
            assert task_id not in default.log()
        assert plain in default.log() and plain not in gpu_node.log()

        # An explicit mapping wins over the snapshots: sent to the default queue, the node there
        # does not have the model.
        with ModelClient(
            redis_url, queue=prefix, key_prefix=prefix, queues={"edge_segments": prefix}
        ) as wrong:
            assert wrong.queue_for("edge_segments") == prefix
            with pytest.raises(ModelWorkersError) as refused:
                wrong.predict("edge_segments", rows, timeout=TIMEOUT)
        print(
            f"default node's answer for the gpu model: {type(refused.value).__name__}: "
            f"{refused.value}"
        )
        assert "edge_segments" in str(refused.value)


# ---- asyncio ---------------------------------------------------------------------------------
def test_async_calls_run_concurrently_without_blocking_the_event_loop(
    serving_worker: WorkerProcess, mc: ModelClient
) -> None:
    texts = [
        f"Review {i}: {'wonderful and great' if i % 2 else 'awful and boring'}" for i in range(20)
    ]

    async def main() -> tuple[list[Sentiment], list[float], float]:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                gaps.append(now - last)
                last = now

        async with AsyncModelClient(
            serving_worker.redis_url,
            queue=serving_worker.queue,
            key_prefix=serving_worker.prefix,
            timeout=TIMEOUT,
        ) as ac:
            ticking = asyncio.create_task(ticker())
            started = loop.time()
            results = await asyncio.gather(*(ac.analyze(t) for t in texts))
            elapsed = loop.time() - started
            done.set()
            await ticking
        return results, gaps, elapsed

    results, gaps, elapsed = asyncio.run(main())
    assert len(results) == 20 and all(isinstance(r, Sentiment) for r in results)
    expected = [mc.analyze(t) for t in texts]
    assert [(r.label, r.score, r.model) for r in results] == [
        (e.label, e.score, e.model) for e in expected
    ]
    # The ticker kept its 10 ms rhythm (with room for a busy machine) for as long as the calls ran.
    assert len(gaps) >= max(1, int(elapsed / 0.05)), (elapsed, gaps)
    print(f"20 async analyze calls in {elapsed:.2f} s; longest loop gap {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < 0.2, sorted(gaps)[-5:]


def test_async_errors_and_timeouts(serving_worker: WorkerProcess) -> None:
    nobody = f"nobody-listens-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with AsyncModelClient(
            serving_worker.redis_url,
            queue=serving_worker.queue,
            key_prefix=serving_worker.prefix,
            timeout=TIMEOUT,
        ) as ac:
            with pytest.raises(InvalidInput, match=r"^text: "):
                await ac.analyze("")
            with pytest.raises(ModelNotFound):
                await ac.predict("no_such_model", [1.0])
            batch = await ac.analyze_batch(["Great.", "Awful."])
            assert [s.label for s in batch] == ["positive", "negative"]
            assert (await ac.assign(ROWS)).model == "customer_segments"
            assert len((await ac.forecast_predict("sunspots_arima", 2)).yhat) == 2
            assert (await ac.routes())["sentiment"] == serving_worker.queue
        async with AsyncModelClient(
            serving_worker.redis_url, queue=nobody, key_prefix=serving_worker.prefix
        ) as idle:
            started = time.monotonic()
            with pytest.raises(ResultTimeout) as timed_out:
                await idle.analyze("hello", timeout=0.5)
            assert 0.5 <= time.monotonic() - started < 5
            assert timed_out.value.state == "PENDING"

    asyncio.run(asyncio.wait_for(main(), 4 * TIMEOUT))
    serving_worker.client.delete(nobody)


def test_importing_the_client_does_not_import_the_ml_stack_or_the_tasks() -> None:
    code = (
        "import sys, workers.client, shared.results; "
        "bad = [m for m in ('torch', 'transformers', 'prophet', 'statsmodels', 'sklearn', "
        "'tasks', 'workers.app') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
