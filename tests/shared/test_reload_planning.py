"""Reload planning (shared/reload.py) against a real Redis and a real in-process registry: what
a sender writes and publishes, what a process does with a request, how replies are collected,
rolled back and restored. No worker process: the test plays the processes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis

from harness import build_kmeans, wait_for, write_manifest
from shared.errors import ReloadRefused
from shared.manifest import Manifest, load_manifest
from shared.records import ProcessReply, ReloadRequest, ReloadResult
from shared.registry import ModelRegistry
from shared.reload import (
    channel,
    collect_replies,
    converge,
    desired_key,
    handle_request,
    read_desired,
    reply_key,
    restore_desired,
    send_reload,
    validate_request,
)
from shared.state import publish_snapshot
from tests.shared.test_state import snap


def desired_of(client: redis.Redis, prefix: str, node: str | None) -> dict[str, str]:
    """The desired states as their encoded values (a plain version when it is one)."""
    return {name: want.encode() for name, want in read_desired(client, prefix, node).items()}


def next_message(pubsub: redis.client.PubSub) -> bytes:
    """The next message on a subscribed channel (skipping the subscription's own replies)."""
    message = wait_for(lambda: pubsub.get_message(timeout=0.2), 5, "a message on the channel")
    data: bytes = message["data"]
    return data


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    build_kmeans(tmp_path / "seg1.joblib")
    build_kmeans(tmp_path / "seg2.joblib", k=2)
    (tmp_path / "bad.joblib").write_bytes(b"not a pickle")
    return load_manifest(
        write_manifest(
            tmp_path,
            [
                {"name": "seg", "family": "sklearn", "path": "seg1.joblib", "version": "1"},
                {"name": "seg", "family": "sklearn", "path": "seg2.joblib", "version": "2"},
                {"name": "seg", "family": "sklearn", "path": "bad.joblib", "version": "bad"},
                {"name": "tb", "family": "textblob", "required": False},
            ],
        )
    )


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:6]}"


def test_requests_name_listed_models_and_versions_only(manifest: Manifest) -> None:
    assert validate_request(manifest, None, None) == ["seg", "tb"]
    assert validate_request(manifest, ["seg"], "2") == ["seg"]
    for models, version, problem in [
        (["../etc/passwd"], None, "not paths"),
        (["nope"], None, "'nope' is not in the manifest"),
        (["seg"], "9", "has no version '9'"),
        (["seg", "tb"], "2", "only be given when reloading one model"),
        (None, "2", "only be given when reloading one model"),
    ]:
        with pytest.raises(ReloadRefused, match=problem):
            validate_request(manifest, models, version)


def test_a_fleet_reload_sets_the_desired_version_and_reaches_the_channel(
    manifest: Manifest, client: redis.Redis, prefix: str
) -> None:
    for node, pid in [("a@h", 1), ("b@h", 2)]:
        publish_snapshot(client, prefix, snap(node, pid, seg="READY@1"), ttl=60)
    client.hset(desired_key(prefix, "b@h"), "seg", "bad")  # an older per-node pin
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(prefix))
    sent = send_reload(client, prefix, manifest, models=["seg"], version="2")
    assert sorted(sent.expected) == [("a@h", 1), ("b@h", 2)] and sent.receivers == 1
    assert desired_of(client, prefix, "a@h") == {"seg": "2"}
    assert desired_of(client, prefix, "b@h") == {"seg": "2"}  # the pin was superseded
    assert (desired_key(prefix, "b@h"), "seg", "bad") in sent.previous_desired
    published = ReloadRequest.model_validate_json(next_message(pubsub))
    assert published.id == sent.id and published.models == ["seg"] and published.version == "2"


def test_a_node_reload_pins_that_node_only(
    manifest: Manifest, client: redis.Redis, prefix: str
) -> None:
    for node, pid in [("a@h", 1), ("b@h", 2)]:
        publish_snapshot(client, prefix, snap(node, pid, seg="READY@1"), ttl=60)
    sent = send_reload(client, prefix, manifest, models=["seg"], version="2", nodes=["b@h"])
    assert sent.expected == [("b@h", 2)]
    assert desired_of(client, prefix, "a@h") == {} and desired_of(client, prefix, "b@h") == {
        "seg": "2"
    }


def test_a_fleet_reload_supersedes_the_pin_of_a_node_that_is_down(
    manifest: Manifest, client: redis.Redis, prefix: str
) -> None:
    publish_snapshot(client, prefix, snap("a@h", 1, seg="READY@1"), ttl=60)
    send_reload(client, prefix, manifest, models=["seg"], version="1", nodes=["gone@h"])
    assert desired_of(client, prefix, "gone@h") == {"seg": "1"}  # pinned, no live process
    sent = send_reload(client, prefix, manifest, models=["seg"], version="2")
    assert desired_of(client, prefix, "gone@h") == {"seg": "2"}  # found without a SCAN
    assert (desired_key(prefix, "gone@h"), "seg", "1") in sent.previous_desired


def test_collecting_every_good_reply_is_ok_and_keeps_the_desired_version(
    manifest: Manifest, client: redis.Redis, prefix: str
) -> None:
    publish_snapshot(client, prefix, snap("a@h", 1, seg="READY@1"), ttl=60)
    sent = send_reload(client, prefix, manifest, models=["seg"], version="2")
    good = ReloadResult(model="seg", old_version="1", new_version="2", ok=True, seconds=0.1)
    reply = ProcessReply(node="a@h", host="h", pid=1, ok=True, results=[good])
    client.rpush(reply_key(prefix, sent.id), reply.model_dump_json())
    outcome = collect_replies(client, prefix, sent, timeout=2)
    assert outcome.ok and outcome.missing == [] and outcome.rolled_back == []
    assert desired_of(client, prefix, None) == {"seg": "2"}


def test_a_silent_process_fails_the_reload_restores_and_rolls_back_the_others(
    manifest: Manifest, client: redis.Redis, prefix: str
) -> None:
    client.hset(desired_key(prefix), "seg", "1")
    for node, pid in [("a@h", 1), ("b@h", 2)]:
        publish_snapshot(client, prefix, snap(node, pid, seg="READY@1"), ttl=60)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(prefix))
    sent = send_reload(client, prefix, manifest, models=["seg"], version="2")
    assert ReloadRequest.model_validate_json(next_message(pubsub)).id == sent.id
    switched = ReloadResult(model="seg", old_version="1", new_version="2", ok=True, seconds=0.1)
    reply = ProcessReply(node="a@h", host="h", pid=1, ok=True, results=[switched])
    client.rpush(reply_key(prefix, sent.id), reply.model_dump_json())
    outcome = collect_replies(client, prefix, sent, timeout=0.5)
    assert not outcome.ok
    assert [(m.node, m.pid) for m in outcome.missing] == [("b@h", 2)]
    assert desired_of(client, prefix, None) == {"seg": "1"}  # put back exactly
    (back,) = outcome.rolled_back
    assert back.models == ["seg"] and back.version == "1" and back.nodes == ["a@h"]
    assert json.loads(next_message(pubsub))["id"] == back.id


def test_restore_removes_what_was_absent_and_puts_back_what_was_there(
    client: redis.Redis, prefix: str
) -> None:
    client.hset(desired_key(prefix), "seg", "2")
    client.hset(desired_key(prefix), "tb", "x")
    request = ReloadRequest(
        id="r",
        previous_desired=[(desired_key(prefix), "seg", None), (desired_key(prefix), "tb", "y")],
    )
    restore_desired(client, request)
    assert desired_of(client, prefix, None) == {"tb": "y"}


def test_a_process_handles_a_request_model_by_model(manifest: Manifest) -> None:
    registry = ModelRegistry()
    registry.load_all(manifest.active())
    ok = handle_request(
        registry, lambda: manifest, ReloadRequest(id="1", models=["seg"], version="2")
    )
    assert [(r.model, r.old_version, r.new_version, r.ok) for r in ok] == [("seg", "1", "2", True)]
    bad = handle_request(
        registry, lambda: manifest, ReloadRequest(id="2", models=["seg"], version="bad")
    )
    assert not bad[0].ok and bad[0].error and registry.metadata("seg").version == "2"
    refused = handle_request(registry, lambda: manifest, ReloadRequest(id="3", models=["x/y"]))
    assert refused[0].model is None and "ReloadRefused" in (refused[0].error or "")


def test_converging_reloads_what_differs_and_tries_each_version_once(manifest: Manifest) -> None:
    registry = ModelRegistry()
    registry.load_all(manifest.active())
    attempted: set[tuple[str, str]] = set()
    results = converge(registry, lambda: manifest, {"seg": "bad", "tb": "1.0.0"}, attempted)
    assert [(r.model, r.ok) for r in results] == [("seg", False)]
    assert converge(registry, lambda: manifest, {"seg": "bad"}, attempted) == []  # not again
    results = converge(registry, lambda: manifest, {"seg": "7"}, attempted)
    assert results[0].error and "no version '7'" in results[0].error
    assert converge(registry, lambda: manifest, {"seg": "2"}, attempted)[0].ok
    assert registry.metadata("seg").version == "2"
