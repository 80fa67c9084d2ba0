"""The control plane at fleet scale on one machine: per N solo-pool nodes of a tiny model, start
time, Redis commands/s per process at rest, status and reload times (docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis

from harness import ROOT, WorkerProcess
from harness.fleet import start_fleet, stop_fleet, tiny_manifest, wait_fleet
from shared.manifest import load_manifest
from shared.reload import collect_replies, send_request
from shared.state import read_snapshots
from workers.embedded import EmbeddedRedis


def commands(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()})


def at_rest(client: redis.Redis, nodes: list[WorkerProcess], seconds: float) -> dict[str, Any]:
    """Per process, over ``seconds``: Redis commands per second (and the busiest ones), bytes
    Redis sends per second (pub/sub fan-out shows here, not in the command counts) and CPU."""
    procs = [psutil.Process(node.pid) for node in nodes]
    cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
    before, out0 = commands(client), client.info("stats")["total_net_output_bytes"]
    time.sleep(seconds)
    delta = commands(client) - before
    out = client.info("stats")["total_net_output_bytes"] - out0
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
    delta["info"] -= 2  # our own INFOs
    n = len(nodes)
    return {
        "commands_per_s": round(sum(delta.values()) / seconds / n, 2),
        "top": {k: round(v / seconds / n, 2) for k, v in delta.most_common(6)},
        "redis_out_kib_per_s": round(out / seconds / n / 1024, 2),
        "cpu_pct": round(100 * cpu / seconds / n, 2),
    }


def cli(env: dict[str, str], *args: str) -> tuple[float, str]:
    """(seconds, stdout) of ``python -m workers.cli ARGS``."""
    t0, cmd = time.perf_counter(), [sys.executable, "-m", "workers.cli", *args]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out.check_returncode()
    return time.perf_counter() - t0, out.stdout


def measure(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server, prefix = EmbeddedRedis().start(), f"fleet-{uuid.uuid4().hex[:6]}"
    manifest = tiny_manifest(work / f"models-{n}")
    client = redis.Redis.from_url(server.url)
    nodes: list[WorkerProcess] = []
    row: dict[str, Any] = {"nodes": n, "gossip": args.gossip, "filler_keys": args.filler}
    try:
        if args.filler:
            with client.pipeline(transaction=False) as pipe:
                for i in range(args.filler):
                    pipe.set(f"celery-task-meta-{uuid.UUID(int=i)}", "{}", ex=3600)
                pipe.execute()
        t0 = time.monotonic()
        # the default heartbeat and TTL, not the harness's fast ones
        env = {"MODELWORKERS_HEARTBEAT_SECONDS": "5", "MODELWORKERS_STATE_TTL_SECONDS": "30"}
        nodes = start_fleet(server.url, n, prefix, manifest, work, env, args.gossip)
        wait_fleet(client, prefix, nodes, args.start_timeout)
        row["start_s"] = round(time.monotonic() - t0, 1)
        time.sleep(3)  # startup traffic settles
        row["at_rest"] = at_rest(client, nodes, args.rest)
        env = os.environ | {"MODELWORKERS_REDIS_URL": server.url, "MODELWORKERS_KEY_PREFIX": prefix}
        env |= {"MODELWORKERS_TASK_QUEUE": prefix, "MODELWORKERS_MODEL_MANIFEST": str(manifest)}
        status_cli = [cli(env, "status", "--json")[0] for _ in range(3)]
        status_read = []
        for _ in range(5):
            t = time.perf_counter()
            assert len(read_snapshots(client, prefix)) == n
            status_read.append(time.perf_counter() - t)
        row["status_cli_s"] = round(statistics.median(status_cli), 3)
        row["status_read_ms"] = round(statistics.median(status_read) * 1000, 2)
        loaded = load_manifest(manifest)
        reloads, cli_reloads, own = [], [], []
        for version in ("1.1.0", "1.0.0", "1.1.0"):
            t = time.perf_counter()
            sent = send_request(client, prefix, loaded, models=["seg"], version=version)
            outcome = collect_replies(client, prefix, sent, timeout=120)
            reloads.append(time.perf_counter() - t)
            assert outcome.ok and len(outcome.replies) == n, outcome.missing
            own += [r.seconds or 0.0 for reply in outcome.replies for r in reply.results]
        for version in ("1.0.0", "1.1.0"):
            seconds, out = cli(env, "reload", "seg", "--version", version, "--json")
            assert json.loads(out)["ok"]
            cli_reloads.append(seconds)
        times = {"reload_s": reloads, "reload_cli_s": cli_reloads, "reload_in_process_s": own}
        row |= {k: round(statistics.median(v), 3) for k, v in times.items()}
        row["redis_used_memory_mib"] = round(client.info("memory")["used_memory"] / 2**20, 1)
        row["redis_clients_per_node"] = round(client.info("clients")["connected_clients"] / n, 1)
        procs = [psutil.Process(node.pid) for node in nodes]
        rss = sum(p.memory_info().rss for p in procs + [c for p in procs for c in p.children()])
        row["rss_per_node_mib"] = round(rss / 2**20 / n, 0)
    finally:
        stop_fleet(nodes)
        client.close()
        server.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 10, 30])
    parser.add_argument("--gossip", action="store_true", help="with mingle and gossip")
    parser.add_argument("--filler", type=int, default=0, help="K task results in Redis first")
    parser.add_argument("--rest", type=float, default=10.0, help="seconds counted at rest")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="append each row to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelworkers-fleet-") as tmp:
        for n in args.nodes:
            row = measure(n, args, Path(tmp))
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
