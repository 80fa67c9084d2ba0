"""MLServer's adaptive batching on the throughput section's model and work (its venv in .cache), 64
single-text V2 requests in flight: http.client, a thread each (httpx's took 0.5 of the 2 cores)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any

from bench.data import CACHE, MINILM_DIR, ROOT, ensure_cache, texts
from bench.helper import clean_env
from bench.run import Ctx, med, pct

VENV, MODEL, LOG = CACHE / "mlserver-venv", CACHE / "mlserver-model", CACHE / "mlserver-venv.log"
# torch: the CPU wheel on disk (unpinned: the CUDA build); transformers: .venv's (pyproject's);
# uvloop: 0.22 on breaks mlserver 1.7.1's parallel workers (no current event loop)
PINS = ("mlserver==1.7.1", "torch==2.13.0", "transformers==5.24.0", "uvloop==0.21.0")
# 5-20 ms, and parallel_workers 1 (an inference process), served alike: 10 ms, in the server
BATCH = {"max_batch_size": 32, "max_batch_time": 0.01, "parameters": {"uri": str(MINILM_DIR)}}
SERVER = {"debug": False, "host": "127.0.0.1", "metrics_endpoint": None, "gzip_enabled": False}
SERVER["parallel_workers"] = 0
Conn = http.client.HTTPConnection


def ensure_env() -> None:
    """MLServer's venv, built once (pip, about a minute); RuntimeError if it cannot be (see LOG)."""
    if (stamp := VENV / "pins.txt").exists() and stamp.read_text() == " ".join(PINS):
        return
    ensure_cache()
    venv = [sys.executable, "-m", "venv", "--clear", str(VENV)]  # .venv's Python (mlserver: < 3.13)
    with LOG.open("w") as log:
        try:
            for cmd in (venv, [f"{VENV}/bin/pip", "install", *PINS]):
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"no MLServer venv ({exc}); see {LOG}") from exc
    stamp.write_text(" ".join(PINS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drive(conns: list[Conn], corpus: list[str], total: int) -> dict[str, Any]:
    """``total`` single-text requests, one in flight per connection; failed: any but a label."""
    labels = set(json.loads((MINILM_DIR / "config.json").read_text())["id2label"].values())
    text = {"name": "text", "shape": [1], "datatype": "BYTES"}
    bodies = [json.dumps({"inputs": [text | {"data": [t]}]}) for t in corpus]
    jobs, lat, failures, head = iter(range(total)), [], [], {"Content-Type": "application/json"}

    def one(conn: Conn) -> None:
        for i in jobs:  # shared: next() on a range iterator holds the GIL
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v2/models/minilm/infer", bodies[i % len(bodies)], head)
                out = {o["name"]: o["data"] for o in json.load(conn.getresponse())["outputs"]}
                if out["label"][0] not in labels:
                    failures.append(str(out)[:200])
            except Exception as exc:  # a failed task; the next request reconnects
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                conn.close()
            lat.append((time.perf_counter() - t0) * 1000)

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(len(conns)) as pool:
        list(pool.map(one, conns))
    s, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    out: dict[str, Any] = dict(seconds=round(s, 4), tasks=total, tasks_per_s=round(total / s, 1))
    out |= dict(inflight=64, failures=failures[:20], failed=len(failures))
    out["client_cores"] = round(cpu / s, 3)  # this process's CPU: the client's
    return out | dict(p50_ms=round(med(lat), 3), p99_ms=round(pct(lat, 99), 3))


def ready(conn: Conn) -> bool:
    with suppress(OSError, http.client.HTTPException):
        conn.request("GET", "/v2/models/minilm/ready")
        return (answer := conn.getresponse()).read() is not None and answer.status == 200
    conn.close()
    return False


@contextmanager
def serving(ctx: Ctx) -> Iterator[tuple[Callable[[int], dict[str, Any]], dict[str, Any]]]:
    """MLServer serving MiniLM, warm: yields (send ``n`` requests at 64 in flight, its settings);
    the server is stopped, with its workers, on the way out."""
    ensure_env()
    port = free_port()
    settings = SERVER | {"http_port": port, "grpc_port": free_port()}  # gRPC: unused
    model = {"name": "minilm", "implementation": "bench.mlserver_runtime.MiniLM", **BATCH}
    MODEL.mkdir(parents=True, exist_ok=True)
    (MODEL / "settings.json").write_text(json.dumps(settings))
    (MODEL / "model-settings.json").write_text(json.dumps(model))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    env = clean_env(env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    conns = [Conn("127.0.0.1", port, timeout=120) for _ in range(64)]
    cmd, log = [str(VENV / "bin/mlserver"), "start", str(MODEL)], ctx.logs / "mlserver.log"
    with log.open("wb") as f:  # its own session: its group is the server and its workers
        proc = subprocess.Popen(cmd, cwd=MODEL, env=env, stdout=f, stderr=f, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ready(conns[0]):  # the model: a server whose model failed to load stays up
            text = log.read_text(errors="replace")
            if proc.poll() is not None or time.monotonic() > deadline or "failed to load" in text:
                raise RuntimeError(f"mlserver: no model ready ({proc.poll()}):\n{text[-3000:]}")
            time.sleep(0.5)
        corpus = texts()
        drive(conns, corpus, 2 * len(corpus))  # warm: after one pass, run 1 was often ~15% slower
        yield partial(drive, conns, corpus), settings | model | {"pins": PINS}
    finally:
        for conn in conns:
            conn.close()
        proc.terminate()  # the server stops its workers; then whatever is left of its group
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=5)
