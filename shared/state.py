"""The registry in Redis: per-process snapshots with a TTL, and the fleet summary built from them.

Keys (``PREFIX`` is the ``KEY_PREFIX`` setting, default ``modelworkers``)::

    PREFIX:proc:HOST:PID   JSON snapshot of one pool process (see ModelRegistry.snapshot), with
                           "heartbeat" and "node"; expires STATE_TTL_SECONDS after its last write,
                           so a dead process disappears by itself.

A web app reads these keys (SCAN PREFIX:proc:*) to know model health without asking a worker.
Only redis-py is used here, no Celery.
"""

from __future__ import annotations

import json
import time
from typing import Any

PROC = "proc"


def proc_key(prefix: str, host: str, pid: int) -> str:
    return f"{prefix}:{PROC}:{host}:{pid}"


def publish_snapshot(client: Any, prefix: str, snapshot: dict[str, Any], ttl: int) -> str:
    """Write one process's snapshot (adds ``heartbeat``); returns the key."""
    snapshot = {**snapshot, "heartbeat": time.time()}
    key = proc_key(prefix, snapshot["host"], snapshot["pid"])
    client.set(key, json.dumps(snapshot, default=str), ex=ttl)
    return key


def read_snapshots(client: Any, prefix: str) -> list[dict[str, Any]]:
    """Every live process's snapshot, sorted by node then pid."""
    keys = sorted(client.scan_iter(match=f"{prefix}:{PROC}:*", count=500))
    snaps: list[dict[str, Any]] = []
    if not keys:
        return snaps
    for raw in client.mget(keys):
        if raw:  # expired between SCAN and MGET
            snaps.append(json.loads(raw))
    return sorted(snaps, key=lambda s: (s.get("node") or s.get("host", ""), s.get("pid", 0)))


def fleet_summary(snapshots: list[dict[str, Any]], *, min_processes: int = 1) -> dict[str, Any]:
    """Is every required model READY in at least ``min_processes`` processes; who is not ready.

    Returns ``{"ready", "processes", "ready_processes", "models": {name: {"required",
    "ready_in", "versions", "failed_in"}}, "not_ready": [{"node", "pid", "reasons"}]}``.
    """
    models: dict[str, dict[str, Any]] = {}
    not_ready = []
    for snap in snapshots:
        if not snap.get("ready"):
            not_ready.append(
                {
                    "node": snap.get("node") or snap.get("host"),
                    "pid": snap.get("pid"),
                    "reasons": snap.get("not_ready_reasons", []),
                }
            )
        for name, meta in snap.get("models", {}).items():
            agg = models.setdefault(
                name,
                {
                    "required": meta.get("required", False),
                    "ready_in": 0,
                    "failed_in": 0,
                    "versions": {},
                },
            )
            if meta.get("status") == "READY":
                agg["ready_in"] += 1
                agg["versions"][meta["version"]] = agg["versions"].get(meta["version"], 0) + 1
            elif meta.get("status") == "FAILED":
                agg["failed_in"] += 1
    enough = len(snapshots) >= min_processes and all(
        m["ready_in"] >= min_processes for m in models.values() if m["required"]
    )
    return {
        "ready": bool(snapshots) and enough and not not_ready,
        "processes": len(snapshots),
        "ready_processes": len(snapshots) - len(not_ready),
        "models": models,
        "not_ready": not_ready,
    }
