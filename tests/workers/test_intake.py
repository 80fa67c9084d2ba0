"""The message checks of workers/intake.py, on messages built in memory (no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.message import Message

from tests.reliability.hostile import body, deep_json, nested, task_headers
from workers.intake import (
    MessageLimits,
    Refused,
    check_envelope,
    check_task_message,
    json_depth,
    object_shape,
)

LIMITS = MessageLimits(max_bytes=4096, max_depth=8, max_args=4)


def message(raw: bytes, headers: Any = None, **kw: Any) -> Message:
    return Message(
        body=raw,
        content_type=kw.pop("content_type", "application/json"),
        content_encoding="utf-8",
        headers=task_headers("t") if headers is None else headers,
        properties=kw.pop("properties", {"delivery_tag": "1"}),
        delivery_info={"exchange": "", "routing_key": "q"},
    )


def refusal(msg: Message) -> str:
    with pytest.raises(Refused) as info:
        check_task_message(msg, LIMITS)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "depth"),
    [(b"1", 0), (b"[]", 1), (b'[[1], {"a": [2]}]', 3), (b'["[[[[", "]"]', 1), (b'["\\"[["]', 1)],
)
def test_json_depth_counts_brackets_outside_strings_only(text: bytes, depth: int) -> None:
    assert json_depth(text) == depth


def test_json_depth_reads_a_200000_deep_body_without_recursion() -> None:
    assert json_depth(deep_json(200_000)) == 200_000


def test_object_shape_stops_early_on_a_deep_structure() -> None:
    depth, _ = object_shape(nested(100_000), 8)
    assert depth == 9


def test_a_well_formed_message_passes_and_is_decoded_once() -> None:
    msg = message(body([[[1.0, 2.0]]], {"model": "m"}))
    check_task_message(msg, LIMITS)
    assert msg._decoded_cache == [[[[1.0, 2.0]]], {"model": "m"}, json.loads(body([]))[2]]


@pytest.mark.parametrize(
    ("raw", "headers", "problem"),
    [
        (body([nested(8)]), None, "args nested 9 levels deep, deeper than the limit of 8"),
        (body(["x" * 5000]), None, "more than the limit of 4,096 (MODELWORKERS_MAX_MESSAGE_BYTES)"),
        (body([1, 2, 3, 4, 5]), None, "5 positional arguments, more than the limit of 4"),
        (body([], {str(i): i for i in range(5)}), None, "5 keyword arguments"),
        (b"{}", None, "must be [args, kwargs, embed]"),
        (b"[1, {}, {}]", None, "args must be an array, not int"),
        (b"[[], [], {}]", None, "kwargs must be an object, not an array"),
        (b"nope", None, "not valid JSON"),
        (body([]), task_headers("t", id=7), "header 'id' must be"),
        (body([]), task_headers("t", id="has space"), "header 'id' must be"),
        (body([]), {"id": "x"}, "no 'task' header"),
        (body([]), task_headers("t", retries="3"), "'retries' must be"),
        (body([]), task_headers("t", timelimit=[1, "x"]), "'timelimit' must be"),
        (body([]), task_headers("t", timelimit=[float("inf"), None]), "'timelimit' must be"),
        (body([]), task_headers("t", eta=["2030"]), "'eta' must be a string"),
        (body([]), task_headers("t", compression="zlib"), "compressed"),
        (body([]), task_headers("t", extra=nested(20)), "headers nested deeper than 8"),
        (body([]), task_headers("t", extra="x" * 70_000), "more than 65,536"),
        (body([], {}, {"callbacks": "x"}), None, "options.callbacks must be an array"),
    ],
)
def test_each_broken_rule_is_refused_with_a_message_that_says_what(
    raw: bytes, headers: Any, problem: str
) -> None:
    assert problem in refusal(message(raw, headers))


def test_a_body_that_is_not_json_content_is_refused_before_it_is_decoded() -> None:
    msg = message(b"\x80\x04N.", content_type="application/x-python-serialize")
    assert "content type 'application/x-python-serialize' is not accepted" in refusal(msg)
    assert msg._decoded_cache is None


@pytest.mark.parametrize(
    ("envelope", "problem"),
    [
        ([1], "the envelope is an array"),
        ({"body": ""}, "no 'properties' object"),
        ({"properties": {}}, "delivery_tag must be a string"),
        ({"properties": {"delivery_tag": "1", "delivery_info": []}}, "delivery_info must be"),
        ({"properties": {"delivery_tag": "1", "body_encoding": "rot13"}}, "body_encoding"),
        ({"properties": {"delivery_tag": "1"}, "body": 5}, "'body' must be a string"),
        ({"properties": {"delivery_tag": "1"}, "headers": []}, "'headers' must be an object"),
        (
            {"properties": {"delivery_tag": "1"}, "headers": {"compression": "gzip"}},
            "compressed",
        ),
        ({"properties": {"delivery_tag": "1", "x": nested(30)}}, "properties nested deeper"),
    ],
)
def test_broken_envelopes_are_refused_before_kombu_reads_them(envelope: Any, problem: str) -> None:
    with pytest.raises(Refused, match=problem.replace("(", r"\(")):
        check_envelope(envelope, LIMITS)


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://localhost", "GuardedRedisTransport"),
        ("rediss://localhost", "GuardedRedisTransport"),
        ("sentinel://localhost:26379", "GuardedSentinelTransport"),
    ],
)
def test_every_redis_broker_url_gets_the_guarded_atomic_transport(
    url: str, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain, TLS and Sentinel URLs: envelopes checked, and a message taken and registered as
    unacknowledged in one step (its channel is an AtomicReceive); also in a process that used
    kombu's own transport first (kombu caches the class a scheme resolved to)."""
    from kombu import Connection
    from kombu import transport as kombu_transport
    from kombu.transport import TRANSPORT_ALIASES

    from workers.intake import register_transport
    from workers.receive import AtomicReceive

    scheme = url.split(":", 1)[0]
    kombus = "kombu.transport.redis:" + (
        "SentinelTransport" if scheme == "sentinel" else "Transport"
    )
    monkeypatch.setitem(TRANSPORT_ALIASES, scheme, kombus)
    monkeypatch.delitem(kombu_transport._transport_cache, scheme, raising=False)
    assert Connection(url).get_transport_cls().__module__ == "kombu.transport.redis"  # cached
    register_transport()
    cls = Connection(url).get_transport_cls()
    assert cls.__name__ == transport and cls.__module__ == "workers.intake"
    assert issubclass(cls.Channel, AtomicReceive)
