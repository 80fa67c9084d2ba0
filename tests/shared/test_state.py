"""Snapshots in Redis and the fleet summary, against a real Redis (no worker process)."""

from __future__ import annotations

import time
import uuid

import redis

from harness import wait_for
from shared.records import ModelStatus, ProcessSnapshot
from shared.state import (
    fleet_summary,
    index_key,
    proc_key,
    publish_snapshot,
    read_node_snapshots,
    read_snapshots,
    remove_snapshot,
)


def snap(node: str, pid: int, *, ready: bool = True, **models: str) -> ProcessSnapshot:
    """A snapshot whose models are ``name="STATUS@version"``; seg is required, others not."""
    statuses = {}
    for name, value in models.items():
        status, _, version = value.partition("@")
        statuses[name] = ModelStatus(
            name=name,
            family="sklearn",
            version=version or "1",
            status=status,
            required=name == "seg",
        )
    reasons = [] if ready else ["seg is FAILED: broken"]
    return ProcessSnapshot(
        node=node,
        host="h",
        pid=pid,
        started_at=1.0,
        ready=ready,
        not_ready_reasons=reasons,
        models=statuses,
    )


def test_published_snapshots_come_back_typed_sorted_and_expire(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    before = time.time()
    publish_snapshot(client, prefix, snap("b@h", 2, seg="READY"), ttl=60)
    publish_snapshot(client, prefix, snap("a@h", 9, seg="READY"), ttl=60)
    key = publish_snapshot(client, prefix, snap("a@h", 3, seg="READY"), ttl=1)
    assert key == proc_key(prefix, "h", 3) and 0 < client.ttl(key) <= 1
    client.set(f"{prefix}:proc:h:77", b"{not json")  # written by something else: skipped
    got = read_snapshots(client, prefix)
    assert [(s.node, s.pid) for s in got] == [("a@h", 3), ("a@h", 9), ("b@h", 2)]
    assert all(s.heartbeat is not None and s.heartbeat >= before for s in got)
    assert got[0].models["seg"].status == "READY"
    wait_for(lambda: len(read_snapshots(client, prefix)) == 2, 5, "the 1 s snapshot to expire")


def test_readers_find_processes_through_the_index_not_a_scan(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    # no index yet (processes of an earlier version): a SCAN finds their keys
    client.set(proc_key(prefix, "h", 5), snap("old@h", 5, seg="READY").model_dump_json(), ex=60)
    assert [s.pid for s in read_snapshots(client, prefix)] == [5]

    publish_snapshot(client, prefix, snap("a@h", 1, seg="READY"), ttl=60)
    publish_snapshot(client, prefix, snap("a@h", 2, seg="READY"), ttl=60)
    assert [s.pid for s in read_snapshots(client, prefix)] == [1, 2]  # the index, only
    remove_snapshot(client, prefix, "h", 2)  # a process that stops
    assert client.zrange(index_key(prefix), 0, -1) == [proc_key(prefix, "h", 1).encode()]
    assert [s.pid for s in read_snapshots(client, prefix)] == [1]

    # an entry whose key expired (a dead process) is skipped, then pruned a TTL later
    client.zadd(index_key(prefix), {proc_key(prefix, "h", 3): time.time() - 120})
    assert [s.pid for s in read_snapshots(client, prefix)] == [1]
    publish_snapshot(client, prefix, snap("a@h", 1, seg="READY"), ttl=60, prune=True)
    assert client.zcard(index_key(prefix)) == 1


def test_a_node_reads_its_own_snapshots(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    publish_snapshot(client, prefix, snap("w@h", 1, seg="READY"), ttl=60)  # host h
    publish_snapshot(
        client, prefix, snap("w@g", 2, seg="READY").model_copy(update={"host": "g"}), ttl=60
    )
    publish_snapshot(client, prefix, snap("odd@x", 3, seg="READY"), ttl=60)  # host h, not x
    assert [s.pid for s in read_snapshots(client, prefix, hosts=["g"])] == [2]
    assert [s.pid for s in read_node_snapshots(client, prefix, "w@g")] == [2]
    assert [s.pid for s in read_node_snapshots(client, prefix, "w@h")] == [1]
    assert [s.pid for s in read_node_snapshots(client, prefix, "odd@x")] == [3]  # all keys read
    assert read_node_snapshots(client, prefix, "none@h") == []


def test_the_fleet_is_ready_when_every_process_and_required_model_is() -> None:
    fleet = [snap("a@h", 1, seg="READY@1", opt="FAILED"), snap("b@h", 2, seg="READY@2")]
    summary = fleet_summary(fleet)
    assert summary.ready and summary.processes == 2 and summary.ready_processes == 2
    assert summary.models["seg"].ready_in == 2 and summary.models["seg"].versions == {
        "1": 1,
        "2": 1,
    }
    assert summary.models["opt"].failed_in == 1 and not summary.models["opt"].required
    assert not fleet_summary(fleet, min_processes=3).ready


def test_a_process_that_is_not_ready_is_named_with_its_reasons() -> None:
    summary = fleet_summary(
        [snap("a@h", 1, seg="READY"), snap("b@h", 2, ready=False, seg="FAILED")]
    )
    assert not summary.ready and summary.ready_processes == 1
    assert [(p.node, p.pid, p.reasons) for p in summary.not_ready] == [
        ("b@h", 2, ["seg is FAILED: broken"])
    ]
    assert summary.models["seg"].ready_in == 1 and summary.models["seg"].failed_in == 1


def test_no_process_means_not_ready() -> None:
    summary = fleet_summary([])
    assert not summary.ready and summary.processes == 0


def test_records_still_answer_dict_style_reads() -> None:
    summary = fleet_summary([snap("a@h", 1, seg="READY")])
    assert summary["ready"] is True and summary["models"]["seg"]["ready_in"] == 1
    assert summary.get("nothing", "default") == "default"


def test_the_demo_table_waits_for_a_heartbeat_after_the_last_job(redis_url: str) -> None:
    """``modelworkers demo`` prints the registry once every process has published after its last
    job: a snapshot from before it is not enough, a later one is (bounded by two heartbeats)."""
    import threading

    from shared.settings import Settings
    from workers.cli import counted_snapshots

    client = redis.Redis.from_url(redis_url)
    prefix = f"t-{uuid.uuid4().hex[:6]}"
    settings = Settings(redis_url=redis_url, key_prefix=prefix, heartbeat_seconds=2.0)
    stale = snap("a@h", 1, seg="READY")
    stale.models["seg"].calls = 50  # counts calls already, but not the last jobs' ones
    publish_snapshot(client, prefix, stale, ttl=60)
    since = time.time()
    fresh = snap("a@h", 1, seg="READY")
    fresh.models["seg"].calls = 57
    later = threading.Timer(0.5, publish_snapshot, (client, prefix, fresh), {"ttl": 60})
    later.start()
    try:
        got = counted_snapshots(client, settings, since)
    finally:
        later.join()
    assert [s.models["seg"].calls for s in got] == [57]
    assert time.time() - since < 2 * 2.0 + 1
