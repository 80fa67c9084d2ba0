"""The task broker: BROKER_URL apart from REDIS_URL, Celery's own CELERY_BROKER_URL refused when it
names another server (settings, worker, CLI), and RabbitMQ's queues as every process declares
them (quorum, delivery limit), checked on the real RabbitMQ."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from pydantic import ValidationError

from harness import ROOT, wait_for
from harness.brokers import QUEUE_ARGUMENTS, RabbitVhost
from shared.settings import Settings
from shared.urls import broker_connection_url

REDIS = "redis://127.0.0.1:6390/0"
OTHER = "amqp://guest:secret@rabbit.example:5672//"


def env_without_celery(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    env.pop("MODELWORKERS_REDIS_URL", None)
    return {**env, "MODELWORKERS_REDIS_URL": REDIS, **extra}


def test_the_broker_is_redis_unless_broker_url_names_another() -> None:
    assert broker_connection_url(Settings(redis_url=REDIS)) == REDIS
    assert broker_connection_url(Settings(redis_url=REDIS, broker_url=OTHER)) == OTHER
    assert broker_connection_url(Settings(redis_url=REDIS, broker_url="")) == REDIS


def test_celery_broker_url_naming_another_broker_is_refused_with_both_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CELERY_BROKER_URL", OTHER)
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=REDIS)
    text = str(caught.value)
    assert "CELERY_BROKER_URL=amqp://guest:***@rabbit.example" in text
    assert f"MODELWORKERS_REDIS_URL={REDIS}" in text and "secret" not in text
    # the same broker as BROKER_URL: honoured, nothing diverges
    assert Settings(redis_url=REDIS, broker_url=OTHER).broker_url == OTHER
    monkeypatch.setenv("CELERY_BROKER_URL", REDIS)
    with pytest.raises(ValidationError, match="MODELWORKERS_BROKER_URL=amqp"):
        Settings(redis_url=REDIS, broker_url=OTHER)
    monkeypatch.delenv("CELERY_BROKER_URL")
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "redis://elsewhere:6379/0")
    with pytest.raises(ValidationError, match="CELERY_RESULT_BACKEND=redis://elsewhere"):
        Settings(redis_url=REDIS)


@pytest.mark.integration
def test_the_worker_and_the_cli_refuse_to_start_on_a_diverging_celery_broker_url() -> None:
    env = env_without_celery(CELERY_BROKER_URL=OTHER)
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--pool", "solo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode != 0
    assert "CELERY_BROKER_URL=amqp://guest:***@rabbit.example:5672//" in worker.stderr
    assert f"MODELWORKERS_REDIS_URL={REDIS}" in worker.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "workers.cli", "status"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    assert "invalid settings" in cli.stderr and "CELERY_BROKER_URL=amqp://guest:***@" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_the_delivery_limit_must_stay_above_the_poison_count() -> None:
    with pytest.raises(ValidationError, match="MODELWORKERS_BROKER_DELIVERY_LIMIT must be above"):
        Settings(redis_url=REDIS, broker_delivery_limit=3, poison_lost_deliveries=3)


def test_on_rabbitmq_the_workers_use_quorum_queues_with_celerys_documented_settings() -> None:
    code = (
        "import json, celeryconfig as c; from workers.app import app; "
        "q = app.amqp.queues; "
        "print(json.dumps([c.broker_url, c.task_default_queue_type, "
        "c.task_create_missing_queue_type, c.worker_detect_quorum_queues, "
        "c.broker_transport_options, c.task_acks_late, c.result_backend, "
        "q['modelworkers'].queue_arguments, q['gpu'].queue_arguments]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env_without_celery(MODELWORKERS_BROKER_URL="amqp://guest:guest@127.0.0.1:5672//"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import json

    broker, default_type, missing_type, detect, options, acks_late, backend, default, gpu = (
        json.loads(done.stdout.strip().splitlines()[-1])
    )
    assert broker.startswith("amqp://") and backend.endswith("+" + REDIS)
    assert (default_type, missing_type, detect, acks_late) == ("quorum", "quorum", True, True)
    assert options == {"confirm_publish": True}  # no Redis visibility timeout there
    # the default queue and a queue made on first use (-Q gpu) alike
    assert default == gpu == QUEUE_ARGUMENTS


@pytest.mark.integration
def test_a_message_returned_more_often_than_the_delivery_limit_is_dropped(
    rabbitmq_vhost: RabbitVhost,
) -> None:
    """x-delivery-limit on the queue every process declares: a message that goes back to the
    queue again and again (a node that dies with it) is dropped after the limit."""
    from kombu import Connection, Queue

    from workers.broker import BrokerAMQP  # noqa: F401 (declared as the workers declare it)
    from workers.client import ModelClient

    queue = f"mwtest-limit-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=REDIS, broker_url=rabbitmq_vhost.url, broker_delivery_limit=4)
    client = ModelClient(settings=settings, queue=queue)
    try:
        client.app.send_task("clustering.fit", args=[[[0.0]], 1], queue=queue)
        with Connection(rabbitmq_vhost.url) as conn:
            simple = conn.SimpleQueue(Queue(queue, no_declare=True), no_ack=False)
            deliveries = 0
            while True:
                try:
                    message = simple.get(timeout=3)
                except simple.Empty:
                    break
                deliveries += 1
                message.requeue()
                assert deliveries < 20, "the message keeps coming back"
            simple.close()
        # first delivery + 4 returns allowed, then RabbitMQ drops it
        assert deliveries == 5
        wait_for(lambda: rabbitmq_vhost.messages(queue) == 0, 20, "the queue to be empty")
    finally:
        client.close()


@pytest.mark.integration
@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_without_rabbitmq_the_amqp_tests_fail_in_ci_and_are_skipped_elsewhere(
    ci: str, outcome: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rsE",
            "-p",
            "no:cacheprovider",
            "tests/workers/test_broker.py::test_a_message_returned_more_often_than_the_delivery_limit_is_dropped",
        ],
        cwd=ROOT,
        env={**env_without_celery(), "CI": ci, "RABBITMQ_PORT": "1"},  # nothing listens there
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in done.stdout, done.stdout[-2000:]
    assert "RabbitMQ is not reachable at 127.0.0.1:1" in done.stdout
    if ci:
        assert "the RabbitMQ tests must run in CI" in done.stdout
