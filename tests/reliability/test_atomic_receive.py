"""A consumer that dies the instant it has taken a message off a Redis queue loses nothing.

The consumer is a real kombu connection on a real Redis, in a process of its own that exits
(``os._exit``, no cleanup: what a SIGKILL leaves) as the transport hands over the message it
took, the worst moment for kombu's stock transport, which registers a message as unacknowledged
only after taking it. With the product's transport (``workers.receive``) the message is in the
``unacked`` hash already, and the visibility sweep puts it back for the next consumer; with
kombu's, it is gone: the second case shows what the first one guards against.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer, Queue

from harness import ROOT
from workers.intake import register_transport

pytestmark = pytest.mark.integration

DIE_ON_DELIVERY = textwrap.dedent(
    """
    import os, sys
    from kombu import Connection, Consumer, Queue
    from kombu.transport.redis import Transport
    from workers.intake import GuardedRedisTransport, register_transport

    url, which, queue, prefix = sys.argv[1:5]
    if which == "product":
        register_transport()
        transport = GuardedRedisTransport
    else:
        transport = Transport
    transport._deliver = lambda self, message, queue: os._exit(9)
    options = {"global_keyprefix": prefix}
    with Connection(url, transport=transport, transport_options=options) as conn:
        with Consumer(conn, [Queue(queue)], callbacks=[lambda body, message: None]):
            conn.drain_events(timeout=20)
    sys.exit(3)
    """
)


def publish(url: str, queue: str, prefix: str) -> str:
    """One message on ``queue``; returns its delivery tag, read back from the queue list."""
    with Connection(url, transport_options={"global_keyprefix": prefix}) as conn:
        Producer(conn).publish({"n": 1}, routing_key=queue, declare=[Queue(queue)])
    raw = redis.Redis.from_url(url).lindex(prefix + queue, 0)
    assert raw is not None
    return str(json.loads(raw)["properties"]["delivery_tag"])


def die_taking(url: str, which: str, queue: str, prefix: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", DIE_ON_DELIVERY, url, which, queue, prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 9, done.stderr[-2000:]


@pytest.mark.parametrize("which", ["product", "kombu"])
def test_a_consumer_killed_as_it_takes_a_message(redis_url: str, which: str) -> None:
    register_transport()
    queue, prefix = f"q-{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:6]}:"
    r = redis.Redis.from_url(redis_url)
    tag = publish(redis_url, queue, prefix)

    die_taking(redis_url, which, queue, prefix)

    assert r.llen(prefix + queue) == 0  # taken
    registered = r.hexists(prefix + "unacked", tag)
    if which == "kombu":
        # kombu's transport took it and died before registering it: lost
        assert not registered and r.zscore(prefix + "unacked_index", tag) is None
        return
    assert registered and r.zscore(prefix + "unacked_index", tag) is not None

    # the visibility sweep of the next consumer puts it back, marked redelivered
    got: list[Any] = []
    options = {"global_keyprefix": prefix, "visibility_timeout": 1}
    with Connection(redis_url, transport_options=options) as conn:
        channel = conn.default_channel
        deadline = time.monotonic() + 30
        while r.llen(prefix + queue) == 0:
            assert time.monotonic() < deadline, "the sweep never restored the message"
            channel.qos.restore_visible(num=10, interval=1)
            time.sleep(0.2)  # a visibility timeout of 1 s has to pass
        with Consumer(conn, [Queue(queue)], callbacks=[lambda b, m: (got.append((b, m)), m.ack())]):
            conn.drain_events(timeout=10)
    assert [body for body, _ in got] == [{"n": 1}]
    assert got[0][1].delivery_info["redelivered"] is True
    assert not r.hexists(prefix + "unacked", tag)  # acknowledged: nothing left registered
    r.delete(prefix + queue)


def test_a_redis_that_refuses_the_script_is_read_with_brpop_and_says_so(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without EVAL: the consumer logs one warning naming the window and goes on
    with kombu's BRPOP; the message arrives and is acknowledged."""
    register_transport()
    queue, prefix = f"q-{uuid.uuid4().hex[:8]}", f"t{uuid.uuid4().hex[:6]}:"
    r = redis.Redis.from_url(redis_url)
    user = f"noeval-{uuid.uuid4().hex[:6]}"
    r.acl_setuser(
        user,
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-eval", "-evalsha"],
    )
    kwargs = r.connection_pool.connection_kwargs
    url = f"redis://{user}:pw@{kwargs['host']}:{kwargs['port']}/0"
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append(body)
        message.ack()

    try:
        tag = publish(redis_url, queue, prefix)
        with (
            caplog.at_level("WARNING", logger="modelworkers.receive"),
            Connection(url, transport_options={"global_keyprefix": prefix}) as conn,
            Consumer(conn, [Queue(queue)], callbacks=[on_message]),
        ):
            deadline = time.monotonic() + 20
            while not got:
                assert time.monotonic() < deadline
                with contextlib.suppress(socket.timeout):
                    conn.drain_events(timeout=1)
        assert got == [{"n": 1}]
        warnings = [w.getMessage() for w in caplog.records if w.name == "modelworkers.receive"]
        assert len(warnings) == 1 and "refused the take script" in warnings[0]
        assert "BRPOP" in warnings[0]
        assert not r.hexists(prefix + "unacked", tag)
    finally:
        r.acl_deluser(user)
