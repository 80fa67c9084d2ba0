"""The registry in Redis: per-process snapshots with a TTL, and the fleet summary built from them.

Keys (``PREFIX`` is the ``KEY_PREFIX`` setting, default ``modelworkers``)::

    PREFIX:proc:HOST:PID   JSON snapshot of one serving process (shared.records.ProcessSnapshot),
                           with "heartbeat" and "node"; expires STATE_TTL_SECONDS after its last
                           write, so a dead process disappears by itself.
    PREFIX:procs           sorted set of those keys, scored with the time their snapshot expires:
                           readers find the live processes here instead of scanning the whole
                           database (whose size grows with results, not with processes).

A web app reads the keys listed in PREFIX:procs (ZRANGE, then MGET; a key that is gone is a
dead process) to know model health without asking a worker; SCAN PREFIX:proc:* finds the same
keys, at the cost of a walk through every key. Only redis-py is used here, no Celery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from shared.records import FleetSummary, ModelSummary, NotReadyProcess, ProcessSnapshot

PROC = "proc"
INDEX = "procs"
log = logging.getLogger("modelworkers.state")


def proc_key(prefix: str, host: str, pid: int) -> str:
    return f"{prefix}:{PROC}:{host}:{pid}"


def index_key(prefix: str) -> str:
    return f"{prefix}:{INDEX}"


def publish_snapshot(
    client: Any, prefix: str, snapshot: ProcessSnapshot, ttl: int, *, prune: bool = False
) -> str:
    """Write one process's snapshot (with ``heartbeat`` set to now) and list it in the index, in
    one round trip; returns the key. ``prune``: also drop the index entries of snapshots that
    expired more than a TTL ago (a TTL of grace for the clocks of other hosts)."""
    stamped = snapshot.model_copy(update={"heartbeat": time.time()})
    key = proc_key(prefix, stamped.host, stamped.pid)
    now = stamped.heartbeat or time.time()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(key, stamped.model_dump_json(), ex=ttl)
        pipe.zadd(index_key(prefix), {key: now + ttl})
        if prune:
            pipe.zremrangebyscore(index_key(prefix), "-inf", now - ttl)
        pipe.execute()
    return key


def remove_snapshot(client: Any, prefix: str, host: str, pid: int) -> None:
    """A process that stops: its snapshot and its index entry go at once."""
    key = proc_key(prefix, host, pid)
    with client.pipeline(transaction=False) as pipe:
        pipe.delete(key)
        pipe.zrem(index_key(prefix), key)
        pipe.execute()


def snapshot_keys(client: Any, prefix: str, hosts: Iterable[str] = ()) -> list[Any]:
    """The keys of the processes listed in the index (only those of ``hosts``, if given);
    where there is no index (no process has published yet, or all of them are of a version
    without one), a SCAN of PREFIX:proc:*."""
    keys = client.zrange(index_key(prefix), 0, -1)
    if not keys:
        keys = client.scan_iter(match=f"{prefix}:{PROC}:*", count=1000)
    wanted = {f"{prefix}:{PROC}:{host}:" for host in hosts}
    if not wanted:
        return list(keys)
    return [k for k in keys if _host_part(k) in wanted]


def _host_part(key: bytes | str) -> str:
    text = key.decode() if isinstance(key, bytes) else key
    return text[: text.rfind(":") + 1]


def read_snapshots(client: Any, prefix: str, hosts: Iterable[str] = ()) -> list[ProcessSnapshot]:
    """Every live process's snapshot (of ``hosts`` only, if given: a node's own health check
    reads its own processes, not the fleet's), sorted by node then pid (unreadable ones are
    skipped)."""
    keys = sorted(snapshot_keys(client, prefix, hosts))
    snaps: list[ProcessSnapshot] = []
    if not keys:
        return snaps
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if not raw:  # expired (a dead process), or between ZRANGE and MGET
            continue
        try:
            snaps.append(ProcessSnapshot.model_validate_json(raw))
        except ValidationError as exc:
            log.warning("snapshot %s is not readable: %s", key, exc.errors()[0]["msg"])
    return sorted(snaps, key=lambda s: (s.node or s.host, s.pid))


def read_node_snapshots(client: Any, prefix: str, node: str) -> list[ProcessSnapshot]:
    """The snapshots of one node (its name ``NAME@HOST``, or its host): first from the keys of
    its host alone, so that a node's own health check costs the same in any fleet size; from
    every key when none of those is the node's (a node name whose host part is not the host)."""
    hosts = {node, node.rpartition("@")[2]}
    mine = [s for s in read_snapshots(client, prefix, hosts) if node in (s.node, s.host)]
    return mine or [s for s in read_snapshots(client, prefix) if node in (s.node, s.host)]


def fleet_summary(snapshots: Iterable[ProcessSnapshot], *, min_processes: int = 1) -> FleetSummary:
    """Is every required model READY in at least ``min_processes`` processes; who is not ready."""
    snapshots = list(snapshots)
    models: dict[str, ModelSummary] = {}
    not_ready = []
    for snap in snapshots:
        if not snap.ready:
            not_ready.append(
                NotReadyProcess(
                    node=snap.node or snap.host, pid=snap.pid, reasons=snap.not_ready_reasons
                )
            )
        for name, meta in snap.models.items():
            agg = models.setdefault(name, ModelSummary(required=meta.required))
            if meta.status == "READY":
                agg.ready_in += 1
                agg.versions[meta.version] = agg.versions.get(meta.version, 0) + 1
            elif meta.status == "FAILED":
                agg.failed_in += 1
    enough = len(snapshots) >= min_processes and all(
        m.ready_in >= min_processes for m in models.values() if m.required
    )
    return FleetSummary(
        ready=bool(snapshots) and enough and not not_ready,
        processes=len(snapshots),
        ready_processes=len(snapshots) - len(not_ready),
        models=models,
        not_ready=not_ready,
    )
