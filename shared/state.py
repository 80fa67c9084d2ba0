"""The registry in Redis: per-process snapshots with a TTL, and the fleet summary built from them.

Keys (``PREFIX`` is the ``KEY_PREFIX`` setting, default ``modelworkers``)::

    PREFIX:proc:HOST:PID   JSON snapshot of one serving process (shared.records.ProcessSnapshot),
                           with "heartbeat" and "node"; expires STATE_TTL_SECONDS after its last
                           write, so a dead process disappears by itself.

A web app reads these keys (SCAN PREFIX:proc:*) to know model health without asking a worker.
Only redis-py is used here, no Celery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from shared.records import FleetSummary, ModelSummary, NotReadyProcess, ProcessSnapshot

PROC = "proc"
log = logging.getLogger("modelworkers.state")


def proc_key(prefix: str, host: str, pid: int) -> str:
    return f"{prefix}:{PROC}:{host}:{pid}"


def publish_snapshot(client: Any, prefix: str, snapshot: ProcessSnapshot, ttl: int) -> str:
    """Write one process's snapshot (with ``heartbeat`` set to now); returns the key."""
    stamped = snapshot.model_copy(update={"heartbeat": time.time()})
    key = proc_key(prefix, stamped.host, stamped.pid)
    client.set(key, stamped.model_dump_json(), ex=ttl)
    return key


def read_snapshots(client: Any, prefix: str) -> list[ProcessSnapshot]:
    """Every live process's snapshot, sorted by node then pid (unreadable ones are skipped)."""
    keys = sorted(client.scan_iter(match=f"{prefix}:{PROC}:*", count=500))
    snaps: list[ProcessSnapshot] = []
    if not keys:
        return snaps
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if not raw:  # expired between SCAN and MGET
            continue
        try:
            snaps.append(ProcessSnapshot.model_validate_json(raw))
        except ValidationError as exc:
            log.warning("snapshot %s is not readable: %s", key, exc.errors()[0]["msg"])
    return sorted(snaps, key=lambda s: (s.node or s.host, s.pid))


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
