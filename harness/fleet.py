"""A fleet of small worker nodes on one machine, for the fleet-scale test and bench/fleet.py: N
solo-pool nodes (one process each) of one tiny scikit-learn model with two versions, sharing a
queue and a registry prefix, started together and stopped together."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import WorkerProcess, build_kmeans, wait_for, write_manifest
from shared.state import read_snapshots

VERSIONS = ("1.0.0", "1.1.0")


def tiny_manifest(folder: Path) -> Path:
    """``seg`` (3 features) in versions 1.0.0 (active, the first listed) and 1.1.0."""
    build_kmeans(folder / "seg.joblib")
    entries = [
        {"name": "seg", "family": "sklearn", "path": "seg.joblib", "version": v} for v in VERSIONS
    ]
    return write_manifest(folder, entries)


def start_fleet(
    url: str,
    n: int,
    prefix: str,
    manifest: Path,
    logs: Path,
    env: dict[str, str] | None = None,
    gossip: bool = False,
) -> list[WorkerProcess]:
    """Start ``n`` nodes ``nNNNN@fleet`` at once (not waited for); ``gossip``: with Celery's
    mingle and gossip, which `modelworkers up` and compose turn off."""
    nodes = [
        WorkerProcess(
            url,
            pool="solo",
            concurrency=1,
            env={
                "MODELWORKERS_MODEL_MANIFEST": str(manifest),
                "MODELWORKERS_REHEARSE_TASKS": "false",
                **(env or {}),
            },
            log_dir=logs,
            prefix=prefix,
            node=f"n{i:04d}@fleet",
        )
        for i in range(n)
    ]
    for node in nodes:
        if gossip:
            node.args = [a for a in node.args if a not in ("--without-mingle", "--without-gossip")]
        node.start()
    return nodes


def wait_fleet(client: Any, prefix: str, nodes: list[WorkerProcess], timeout: float) -> None:
    """Until every node's process has published a READY snapshot (any node that exits fails
    at once, with its log)."""

    def ready() -> bool:
        for node in nodes:
            if not node.alive():
                raise RuntimeError(f"{node.node} exited:\n{node.log()[-2000:]}")
        return sum(1 for s in read_snapshots(client, prefix) if s.ready) >= len(nodes)

    wait_for(ready, timeout, f"{len(nodes)} nodes READY", 0.5)


def stop_fleet(nodes: list[WorkerProcess]) -> None:
    """Every node stopped at once (warm shutdown, then SIGKILL)."""
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(lambda node: node.stop(), nodes))
