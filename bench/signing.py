"""What signing task messages costs (MESSAGE_SIGNING): ``python -m bench.signing [--tasks N]``.

Two ``celery -A bench.exp_app worker`` nodes side by side on one private Redis, same settings
(prefork -c 1, a toy model only), one with MESSAGE_SIGNING on (RSA-2048 keys made here), one
without. A typed client per node (``workers.client.ModelClient``, the signing one with its own
key) sends ``bench.noop`` and waits for its result, one task at a time, in alternating blocks,
so that both see the same machine. Printed: the round-trip median and p90 of each, their
difference, and the in-process cost of one signature and one verification. Needs the
``cryptography`` package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import WorkerProcess, build_kmeans, write_manifest
from harness.signing import cert_store, make_identity
from shared.settings import Settings
from workers.client import ModelClient
from workers.embedded import EmbeddedRedis

BLOCK = 50  # tasks per block; the variants alternate block by block


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def in_process(identity: Any, store: Path, repeats: int = 2000) -> dict[str, float]:
    """Microseconds to sign one bench.noop body, and to verify it (workers.signing.Verifier)."""
    from celery.security.certificate import Certificate
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    from workers.signing import Verifier

    serializer = SecureSerializer(
        PrivateKey(identity.key.read_text()), Certificate(identity.cert.read_text()), None
    )
    data = [[1], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    verifier = Verifier(str(store))
    t0 = time.perf_counter()
    for _ in range(repeats):
        signed = serializer.serialize(data)
    sign_us = (time.perf_counter() - t0) / repeats * 1e6
    raw = signed.encode() if isinstance(signed, str) else signed
    t0 = time.perf_counter()
    for _ in range(repeats):
        verifier.open(raw)
    verify_us = (time.perf_counter() - t0) / repeats * 1e6
    return {"sign_us": round(sign_us, 1), "verify_us": round(verify_us, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=400, help="timed tasks per variant")
    parser.add_argument("--warm", type=int, default=50, help="untimed tasks per variant first")
    parser.add_argument("--out", type=Path, help="also write the raw figures here (JSON)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="modelworkers-bench-signing-"))
    worker_id = make_identity(folder / "keys", "worker")
    client_id = make_identity(folder / "keys", "client")
    store = cert_store(folder / "store", worker_id, client_id)
    build_kmeans(folder / "seg.joblib")
    manifest = write_manifest(folder, [{"name": "seg", "family": "sklearn", "path": "seg.joblib"}])
    variants = {"json": {}, "signed": worker_id.env(store)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with EmbeddedRedis() as server:
        workers: dict[str, WorkerProcess] = {}
        clients: dict[str, ModelClient] = {}
        try:
            for name, env in variants.items():
                worker = WorkerProcess(
                    server.url,
                    concurrency=1,
                    log_dir=folder,
                    env={"MODEL_REPOSITORY": str(manifest), **env},
                )
                worker.args[worker.args.index("workers.app")] = "bench.exp_app"
                workers[name] = worker.start()
            for name, worker in workers.items():
                worker.wait_ready(1, timeout=180)
                signing: dict[str, Any] = {}
                if name == "signed":
                    signing = {
                        "message_signing": True,
                        "signing_key": client_id.key,
                        "signing_cert": client_id.cert,
                        "signing_cert_store": store,
                    }
                settings = Settings(
                    redis_url=server.url,
                    task_queue=worker.queue,
                    key_prefix=worker.prefix,
                    **signing,
                )
                clients[name] = ModelClient(settings=settings, timeout=30)
            for client in clients.values():
                for i in range(args.warm):
                    client.result(client.send("bench.noop", i))
            done = 0
            while done < args.tasks:
                block = min(BLOCK, args.tasks - done)
                for name, client in clients.items():
                    for i in range(block):
                        t0 = time.perf_counter()
                        assert client.result(client.send("bench.noop", i)) == i
                        times[name].append((time.perf_counter() - t0) * 1000)
                done += block
        finally:
            for client in clients.values():
                client.close()
            for worker in workers.values():
                worker.stop()
    report: dict[str, Any] = {
        name: {
            "tasks": len(values),
            "p50_ms": round(statistics.median(values), 3),
            "p90_ms": round(pct(values, 90), 3),
        }
        for name, values in times.items()
    }
    report["signed_minus_json_p50_ms"] = round(
        report["signed"]["p50_ms"] - report["json"]["p50_ms"], 3
    )
    report["signed_over_json_p50"] = round(report["signed"]["p50_ms"] / report["json"]["p50_ms"], 3)
    report["in_process"] = in_process(client_id, store)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"report": report, "times_ms": times}, indent=1))


if __name__ == "__main__":
    main()
