"""Fixtures: a private Redis per test session, real worker processes, toy model artifacts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import ROOT, WorkerProcess, close_app
from harness.brokers import Broker, RabbitVhost, rabbitmq_problem
from workers.embedded import EmbeddedRedis

REPOSITORY = ROOT / "models"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    """A Redis of this test session only (tasks left by earlier runs cannot reach us)."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[RabbitVhost]:
    """A RabbitMQ vhost of this test run (deleted at the end). No RabbitMQ: the test fails in
    CI (CI=true), and is skipped elsewhere, with the reason."""
    problem = rabbitmq_problem()
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{problem}: the RabbitMQ tests must run in CI", pytrace=False)
        pytest.skip(problem)
    vhost = RabbitVhost.create()
    try:
        yield vhost
    finally:
        vhost.delete()


@pytest.fixture(scope="session", params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Broker:
    """The task broker of a test that runs on both: Redis (REDIS_URL) and RabbitMQ (BROKER_URL,
    a vhost of this run's own). Results and the registry stay on Redis either way."""
    if request.param == "amqp":
        return Broker("amqp", request.getfixturevalue("rabbitmq_vhost"))
    return Broker("redis")


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture
def start_worker(redis_url: str, worker_logs: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: start a worker node; every node started is stopped by PID after the test."""
    started: list[WorkerProcess] = []

    def _start(**kwargs: Any) -> WorkerProcess:
        kwargs.setdefault("log_dir", worker_logs)
        worker = WorkerProcess(kwargs.pop("redis_url", redis_url), **kwargs).start()
        started.append(worker)
        return worker

    yield _start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def serving_worker(redis_serving_worker: WorkerProcess) -> WorkerProcess:
    """One prefork worker (concurrency 2) with the project's real models, for contract tests."""
    return redis_serving_worker


@pytest.fixture(scope="session")
def redis_serving_worker(redis_url: str, worker_logs: Path) -> Iterator[WorkerProcess]:
    """``serving_worker`` under a name no test module overrides (``broker_serving_worker``)."""
    yield from _serving_worker(redis_url, worker_logs)


@pytest.fixture(scope="session")
def broker_serving_worker(
    request: pytest.FixtureRequest, broker: Broker, redis_url: str, worker_logs: Path
) -> Iterator[WorkerProcess]:
    """``serving_worker`` on each broker (the Redis one is that same worker)."""
    if broker.vhost is None:
        yield request.getfixturevalue("redis_serving_worker")
        return
    yield from _serving_worker(redis_url, worker_logs, broker_url=broker.url(redis_url))


def _serving_worker(
    redis_url: str, worker_logs: Path, broker_url: str | None = None
) -> Iterator[WorkerProcess]:
    """A two-process worker of the shipped models, READY, stopped after."""
    with WorkerProcess(
        redis_url,
        broker_url=broker_url,
        concurrency=2,
        log_dir=worker_logs,
        env={"MODELWORKERS_MODEL_REPOSITORY": str(REPOSITORY)},
    ) as worker:
        worker.wait_ready(2, timeout=120)
        yield worker


@pytest.fixture(scope="session")
def client(serving_worker: WorkerProcess) -> Iterator[Any]:
    app = serving_worker.app()
    yield app
    close_app(app)


@pytest.fixture(autouse=True)
def _no_inherited_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests pass REDIS_URL explicitly to what they start; none may fall back to a shared Redis.
    if os.environ.get("MODELWORKERS_REDIS_URL"):
        monkeypatch.delenv("MODELWORKERS_REDIS_URL")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite's private Redis servers are gone now. Celery's AsyncResult.__del__ would try
    to unsubscribe each leftover result from them at the final garbage collection, retrying
    for ~20 s per result and keeping the run from exiting: nothing is left to clean up."""
    from celery.result import AsyncResult

    AsyncResult.__del__ = lambda self: None  # type: ignore[method-assign]
