"""The workers' result backend (workers/results.py), against a real Redis: a first delivery stores
its result without reading first; a redelivered task still never overwrites a SUCCESS."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from workers.embedded import EmbeddedRedis
from workers.results import ResultBackend, backend_url, first_delivery

pytestmark = pytest.mark.integration


@pytest.fixture
def backend() -> Iterator[tuple[Any, redis.Redis]]:
    server = EmbeddedRedis().start()
    app = Celery(broker=server.url, backend=backend_url(server.url))
    client = redis.Redis.from_url(server.url)
    try:
        assert isinstance(app.backend, ResultBackend)
        yield app.backend, client
    finally:
        client.close()
        app.close()
        server.close()


def delivered(redelivered: bool | None) -> SimpleNamespace:
    info = {} if redelivered is None else {"redelivered": redelivered}
    return SimpleNamespace(
        delivery_info=info,
        id=None,
        task=None,
        args=None,
        kwargs=None,
        hostname=None,
        retries=0,
        ignore_result=False,
        group=None,
        group_index=None,
        chord=None,
        parent_id=None,
        root_id=None,
    )


def reads(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_get", {}).get("calls", 0))


def test_only_a_known_first_delivery_skips_the_read() -> None:
    assert first_delivery(delivered(False))
    assert not first_delivery(delivered(True))
    assert not first_delivery(delivered(None))  # unknown: read first, as Celery does
    assert not first_delivery(None)


def test_a_first_delivery_stores_without_reading(backend: tuple[Any, redis.Redis]) -> None:
    results, client = backend
    before = reads(client)
    for i in range(10):
        results.store_result(f"first-{i}", {"n": i}, "SUCCESS", request=delivered(False))
    assert reads(client) == before
    assert results.get_task_meta(f"first-{3}")["result"] == {"n": 3}


def test_a_redelivered_task_never_overwrites_a_success(backend: tuple[Any, redis.Redis]) -> None:
    results, client = backend
    results.store_result("twice", {"answer": 1}, "SUCCESS", request=delivered(False))
    before = reads(client)
    results.store_result("twice", RuntimeError("second run"), "FAILURE", request=delivered(True))
    assert reads(client) == before + 1  # the redelivered run read first, as Celery does
    meta = results.get_task_meta("twice")
    assert meta["status"] == "SUCCESS" and meta["result"] == {"answer": 1}
    results.store_result("twice", RuntimeError("unknown run"), "FAILURE", request=None)
    assert results.get_task_meta("twice")["status"] == "SUCCESS"
