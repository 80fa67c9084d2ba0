"""Fixtures of the fault-injection tests: a Redis of the test's own, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from workers.embedded import EmbeddedRedis


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A Redis for one test (its queues, unacked index and results are nobody else's)."""
    server = EmbeddedRedis().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    """A raw client of the session's Redis (results, snapshots, queue lengths)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()
