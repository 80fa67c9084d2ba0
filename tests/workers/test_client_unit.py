"""workers.client without a worker: how stored results become errors, how snapshots become
routes, and what the constructor reads. (Against real workers: tests/workers/test_client.py.)"""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from shared import errors
from shared.errors import ModelWorkersError, RedisUnavailable, ResultTimeout, TaskFailed
from shared.records import ModelStatus, ProcessSnapshot
from shared.settings import Settings
from workers.client import ModelClient, decode_meta, error_from, outcome, routes_from


def failure(exc_type: str, message: object, status: str = "FAILURE") -> dict[str, object]:
    """A FAILURE as Celery's JSON result backend stores it."""
    return {
        "status": status,
        "result": {"exc_type": exc_type, "exc_message": message, "exc_module": "shared.errors"},
        "traceback": "Traceback (most recent call last): ...",
        "task_id": "t1",
    }


@pytest.mark.parametrize(
    ("exc_type", "message"),
    [
        ("InvalidInput", "text: must be a non-empty string"),
        ("ModelNotFound", "model 'ghost' is not in the manifest; known models: sentiment"),
        ("ModelNotReady", "model 'sentiment' is not ready (state FAILED): ArtifactError: gone"),
        ("InferenceError", "model 'sentiment'@1.0.0 failed: RuntimeError: boom"),
        ("InferenceTimeout", "model 'sentiment'@1.0.0 failed: no answer within 30 s"),
        ("InvalidMessage", "args nested 901 levels deep, deeper than the limit of 32"),
        ("PoisonTask", "task sentiment.analyze[t1] killed its pool process on 3 deliveries"),
    ],
)
def test_a_failure_raises_the_class_its_exc_type_names_with_the_workers_message(
    exc_type: str, message: str
) -> None:
    error = error_from("t1", failure(exc_type, [message]))
    assert type(error) is getattr(errors, exc_type)
    assert str(error) == message and error.message == message
    with pytest.raises(getattr(errors, exc_type)):
        outcome("t1", failure(exc_type, [message]))


def test_invalid_input_keeps_the_field() -> None:
    error = error_from("t1", failure("InvalidInput", ["series.y[11]: Input should be finite"]))
    assert isinstance(error, errors.InvalidInput) and error.field == "series.y[11]"


def test_any_other_exc_type_is_task_failed_with_type_message_and_id() -> None:
    for meta, kind, message in [
        (failure("TimeLimitExceeded", ["120"]), "TimeLimitExceeded", "120"),
        (failure("NotRegistered", "'no.such'"), "NotRegistered", "'no.such'"),  # not a list
        (failure("TaskRevokedError", ["revoked"], "REVOKED"), "TaskRevokedError", "revoked"),
        (failure("ValueError", []), "ValueError", ""),
        ({"status": "FAILURE", "result": None}, "FAILURE", ""),
    ]:
        error = error_from("t1", meta)
        assert type(error) is TaskFailed and isinstance(error, ModelWorkersError)
        assert (error.exc_type, error.message, error.task_id) == (kind, message, "t1")
        assert str(error) == f"{kind}: {message}"


def test_client_side_errors_are_also_the_builtin_kinds() -> None:
    timed_out = ResultTimeout("abc", 2.5, "STARTED")
    assert isinstance(timed_out, TimeoutError) and isinstance(timed_out, ModelWorkersError)
    assert str(timed_out).startswith("no result for task abc after waiting 2.5 s (state STARTED)")
    assert str(ResultTimeout("rebuilt message")) == "rebuilt message"
    assert isinstance(RedisUnavailable("x"), ConnectionError)
    assert error_from("t1", failure("ResultTimeout", ["x"])).__class__ is TaskFailed  # never stored


def test_stored_records_that_are_not_results_read_as_pending() -> None:
    assert decode_meta(None) == {"status": "PENDING"}
    assert decode_meta(b"not json") == {"status": "PENDING"}
    assert decode_meta(b"[1, 2]") == {"status": "PENDING"}
    assert decode_meta(b'{"status": "SUCCESS", "result": 1}')["result"] == 1
    assert outcome("t1", {"status": "SUCCESS", "result": [1]}) == [1]


def snapshot(pid: int, models: dict[str, tuple[str, str]]) -> ProcessSnapshot:
    return ProcessSnapshot(
        node=f"n{pid}@h",
        host="h",
        pid=pid,
        started_at=time.time(),
        ready=True,
        models={
            name: ModelStatus(name=name, family="sklearn", version="1", status=st, queue=q)
            for name, (q, st) in models.items()
        },
    )


def test_routes_come_from_the_snapshots_and_ready_copies_outvote_the_others() -> None:
    snaps = [
        snapshot(1, {"plain": ("", "READY"), "edge": ("gpu", "READY")}),
        snapshot(2, {"edge": ("gpu", "READY")}),
        snapshot(3, {"edge": ("", "LOADING"), "moving": ("old", "FAILED")}),
        snapshot(4, {"moving": ("new", "READY")}),
    ]
    assert routes_from(snaps) == {"plain": "", "edge": "gpu", "moving": "new"}
    assert routes_from([]) == {}


def test_the_constructor_reads_the_settings_and_connects_to_nothing() -> None:
    settings = Settings(
        redis_url="redis://127.0.0.1:1/2",
        redis_password=SecretStr("pw"),
        task_queue="q1",
        key_prefix="p1",
    )
    client = ModelClient(settings=settings, queues={"edge": "gpu"})
    assert client.url == "redis://:pw@127.0.0.1:1/2"
    assert client.queue == "q1" and client.key_prefix == "p1"
    conf = client.app.conf
    assert conf.task_default_queue == "q1" and conf.task_serializer == "json"
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert "pw" not in repr(client)
    # Routing that needs no snapshot does not touch Redis (port 1 would refuse).
    assert client.queue_for("edge") == "gpu" and client.queue_for(None) == "q1"
    assert client.route("forecast.prophet", ({"y": [1.0]}, 3), {}) == "q1"
    assert client.route("models.predict", ("edge", [[1.0]]), {}) == "gpu"
    assert client.route("clustering.assign", ([[1.0]],), {"model": "edge"}) == "gpu"
    client.close()

    explicit = ModelClient("redis://127.0.0.1:1/0", queue="q2", key_prefix="p2", settings=settings)
    assert explicit.url == "redis://127.0.0.1:1/0"  # an explicit URL carries its own password
    assert (explicit.queue, explicit.key_prefix) == ("q2", "p2")
    explicit.close()
