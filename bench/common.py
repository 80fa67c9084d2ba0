"""What every section shares: the Redis, worker processes (harness), the helper process,
the clients that time tasks, statistics, PSS, the machine description."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.data import ROOT
from harness import WorkerProcess, close_app, wait_for

T = TypeVar("T")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


QUIET_CORES = 0.35  # other tenants' CPU use (cores) under which a measurement block may start


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def busy_cores(window: float = 0.25) -> float:
    """Cores busy (all processes of the machine) over ``window`` seconds."""
    total0, idle0 = _cpu_times()
    time.sleep(window)
    total1, idle1 = _cpu_times()
    spent = max(1, total1 - total0)
    return (spent - (idle1 - idle0)) / spent * CORES


FOREIGN_CORES = 0.3  # other tenants' average CPU use during a block above which it is repeated


def own_processes() -> list[Any]:
    """This benchmark process and every process it started (workers, pool processes, helpers,
    the Redis server, the CLI): all are its descendants."""
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def cpu_seconds(procs: list[Any]) -> dict[int, float]:
    import psutil

    out = {}
    for p in procs:
        with suppress(psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


class Block:
    """One measurement block: what other tenants of the machine used (in cores, averaged over
    the block) = all CPU busy time in /proc/stat minus the CPU time of this run's processes."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.foreign_cores = 0.0
        self.clean = True
        self.record: dict[str, Any] = {}

    def __enter__(self) -> Block:
        self.ctx.quiet()
        self.ours0 = cpu_seconds(own_processes())
        self.stat0 = _cpu_times()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        stat1 = _cpu_times()
        wall = max(1e-3, time.monotonic() - self.t0)
        ours1 = cpu_seconds(own_processes())
        ours = sum(v - self.ours0.get(pid, 0.0) for pid, v in ours1.items())
        tick = os.sysconf("SC_CLK_TCK")
        busy = ((stat1[0] - self.stat0[0]) - (stat1[1] - self.stat0[1])) / tick
        self.foreign_cores = max(0.0, busy - ours) / wall
        self.clean = self.foreign_cores <= FOREIGN_CORES
        self.record = {
            "wall_s": round(wall, 3),
            "foreign_cores": round(self.foreign_cores, 3),
            "clean": self.clean,
        }
        self.ctx.blocks.append(self.record)


# ---- statistics ------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rnd(value: float, digits: int = 3) -> float:
    return round(value, digits) if value == value else value  # keep NaN


def loadavg() -> list[float]:
    with suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


# ---- the machine -----------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "?"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for pkg in (
        "torch",
        "transformers",
        "celery",
        "kombu",
        "redis",
        "prophet",
        "statsmodels",
        "scikit-learn",
        "numpy",
    ):
        with suppress(Exception):
            versions[pkg] = version(pkg)
    gpu = None
    with suppress(Exception):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5)
        gpu = out.stdout.strip() or None
    return {
        "nproc": CORES,
        "cpu_model": cpu,
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": gpu,
    }


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    import hashlib

    product = ["shared", "tasks", "workers", "celeryconfig.py"]
    with suppress(Exception):
        diff = git("diff", "HEAD", "--", *product)
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain")),
            "product_code_uncommitted_diff_sha256": (
                hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None
            ),
            "product_files_changed": git("diff", "--name-only", "HEAD", "--", *product).split(),
        }
    return {"commit": None, "dirty": None}


# ---- the run context ---------------------------------------------------------------------------
@dataclass
class Ctx:
    """One benchmark run: its Redis, log folder, mode and the workers/helpers it started."""

    redis_url: str
    logs: Path
    quick: bool
    notes: list[str] = field(default_factory=list)

    gates: list[dict[str, float]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    gate_budget_s: float = 120.0  # most seconds one section may spend waiting for quiet
    retry_budget: int = 30  # most measurement blocks one section may repeat
    _gate_spent: float = 0.0

    def new_section(self) -> None:
        self._gate_spent = 0.0
        self.gate_budget_s = 5.0 if self.quick else 120.0
        self.retry_budget = 2 if self.quick else 30

    def block(self) -> Block:
        """``with ctx.block() as b: ...``: wait for quiet, then measure what the rest of the
        machine used meanwhile (``b.foreign_cores``)."""
        return Block(self)

    def measure(self, fn: Callable[[], T], tries: int = 3) -> T:
        """Run ``fn`` in a block; repeat it (bounded) while other tenants used more than
        FOREIGN_CORES on average during it. Returns the cleanest attempt's value."""
        attempts: list[tuple[Block, T]] = []
        for attempt in range(tries):
            with self.block() as b:
                value = fn()
            b.record["attempt"] = attempt
            b.record["kept"] = False
            attempts.append((b, value))
            if b.clean or self.retry_budget <= 0:
                break
            if attempt < tries - 1:
                self.retry_budget -= 1
        best, value = min(attempts, key=lambda bv: bv[0].foreign_cores)
        best.record["kept"] = True
        return value

    def block_summary(self, since: int = 0) -> dict[str, Any]:
        blocks = self.blocks[since:]
        if not blocks:
            return {}
        return {
            "blocks": len(blocks),
            "repeated": sum(b.get("attempt", 0) > 0 for b in blocks),
            "contaminated_kept": sum(not b["clean"] for b in blocks if b.get("final", True)),
            "median_foreign_cores": round(med([b["foreign_cores"] for b in blocks]), 3),
            "max_foreign_cores": round(max(b["foreign_cores"] for b in blocks), 2),
        }

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def quiet(self, threshold: float = QUIET_CORES, max_wait: float | None = None) -> float:
        """Wait (bounded) until the rest of the machine uses at most ``threshold`` cores.

        Called between measurement blocks, when this run's own processes are idle, so what
        /proc/stat shows busy is other tenants of the (shared) machine. Returns the busy cores
        of the last sample; every gate is recorded (``gates``) for the results file."""
        limit = max_wait if max_wait is not None else (1.0 if self.quick else 20.0)
        limit = max(0.0, min(limit, self.gate_budget_s - self._gate_spent))
        t0 = time.monotonic()
        while True:
            busy = busy_cores(0.25)
            waited = time.monotonic() - t0
            if busy <= threshold or waited >= limit:
                break
        self._gate_spent += waited
        self.gates.append({"busy_cores": round(busy, 2), "waited_s": round(waited, 2)})
        return busy

    def gate_summary(self, since: int = 0) -> dict[str, Any]:
        gates = self.gates[since:]
        if not gates:
            return {}
        return {
            "gates": len(gates),
            "waited_s": round(sum(g["waited_s"] for g in gates), 1),
            "median_busy_cores_at_start": round(med([g["busy_cores"] for g in gates]), 2),
            "started_busy": sum(g["busy_cores"] > QUIET_CORES for g in gates),
        }

    # -- workers ----------------------------------------------------------------------------
    def worker(
        self,
        *,
        concurrency: int,
        env: dict[str, str],
        pool: str = "prefork",
        prefix: str | None = None,
        node: str | None = None,
    ) -> WorkerProcess:
        base = {
            "HEARTBEAT_SECONDS": "1",  # snapshots: the READY signal comes at once anyway
            "TOKENIZERS_PARALLELISM": "false",
        }
        return WorkerProcess(
            self.redis_url,
            concurrency=concurrency,
            pool=pool,
            env={**base, **env},
            log_dir=self.logs,
            prefix=prefix,
            node=node,
        )

    @contextmanager
    def running(
        self, worker: WorkerProcess, ready_timeout: float = 180.0
    ) -> Iterator[WorkerProcess]:
        """Start ``worker``, wait for every process READY, always stop it by PID."""
        worker.start()
        try:
            processes = 1 if worker.args[worker.args.index("--pool") + 1] == "threads" else None
            worker.wait_ready(processes, timeout=ready_timeout)
            yield worker
        finally:
            worker.stop()

    @contextmanager
    def worker_and_helper(
        self,
        worker: WorkerProcess,
        manifest: Path,
        *,
        threads: int,
        raw_model: Path | None = None,
    ) -> Iterator[Helper]:
        """Start a worker and a helper process side by side (they load at the same time), wait
        for both; stop both by PID."""
        worker.start()
        try:
            with self.helper(manifest, threads=threads, raw_model=raw_model) as helper:
                processes = 1 if worker.args[worker.args.index("--pool") + 1] == "threads" else None
                worker.wait_ready(processes, timeout=180)
                yield helper
        finally:
            worker.stop()

    @contextmanager
    def helper(
        self,
        manifest: Path,
        *,
        threads: int,
        raw_model: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Iterator[Helper]:
        h = Helper(manifest, threads=threads, raw_model=raw_model, env=env, logs=self.logs)
        try:
            yield h
        finally:
            h.close()


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for spawned processes: no inherited model settings."""
    drop = {
        "TORCH_THREADS",
        "OMP_NUM_THREADS",
        "PRELOAD_MODE",
        "PREIMPORT",
        "LOADER_THREADS",
        "SENTIMENT_MODEL",
        "MODEL_MANIFEST",
        "BATCH_WINDOW_MS",
        "BATCH_MAX_SIZE",
        "WORKER_POOL",
        "WORKER_CONCURRENCY",
        "REDIS_URL",
        "KEY_PREFIX",
        "TASK_QUEUE",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra or {})
    return env


class Helper:
    """``python -m bench.helper --serve``: the in-process side, driven over stdin/stdout."""

    def __init__(
        self,
        manifest: Path,
        *,
        threads: int,
        raw_model: Path | None,
        env: dict[str, str] | None,
        logs: Path,
    ) -> None:
        args = [
            sys.executable,
            "-m",
            "bench.helper",
            "--manifest",
            str(manifest),
            "--threads",
            str(threads),
            "--serve",
        ]
        if raw_model:
            args += ["--raw-model", str(raw_model)]
        self.stderr = (logs / f"helper-{uuid.uuid4().hex[:6]}.log").open("wb")
        self.t_spawn = time.time()
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=clean_env({"OMP_NUM_THREADS": str(threads), **(env or {})}),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.first = self._read()
        if self.first.get("event") != "answer":
            raise RuntimeError(f"helper did not start: {self.first}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            raise RuntimeError(
                f"helper exited ({self.proc.poll()}): "
                + Path(self.stderr.name).read_text(errors="replace")[-2000:]
            )
        return dict(json.loads(line))

    def latency(self, family: str, inputs: list[Any], n: int, gap: float = 0.0) -> list[float]:
        """Per-call ms of ``n`` in-process calls of ``family`` on ``inputs`` (cycled), each
        after ``gap`` seconds idle."""
        return list(self.cmd(cmd="latency", family=family, inputs=inputs, n=n, gap=gap)["ms"])

    def cmd(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        if not out.get("ok"):
            raise RuntimeError(f"helper command {cmd.get('cmd')} failed: {out.get('error')}")
        return out

    def close(self) -> None:
        with suppress(Exception):
            if self.proc.poll() is None:
                self.cmd(cmd="quit")
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.stderr.close()


# ---- clients -----------------------------------------------------------------------------------
def release(app: Any, result: Any) -> None:
    """Drop a finished AsyncResult from the client's pending results (and its pub/sub channel)
    now, while Redis is up: the backend otherwise keeps it until exit, when its ``__del__``
    retries a Redis that is gone for minutes."""
    with suppress(Exception):
        app.backend.remove_pending_result(result)
    result.backend = None  # nothing left for __del__ to cancel


class Client:
    """A plain Celery client (what a web app uses): ``send_task(...).get()``."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.app = worker.app()
        self.ids: list[str] = []  # task ids, in order (to find their runtimes in the log)

    def call(
        self, name: str, args: list[Any], kwargs: dict[str, Any] | None = None, timeout: float = 120
    ) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = self.app.send_task(name, args=args, kwargs=kwargs or {})
        self.ids.append(result.id)
        try:
            value = result.get(timeout=timeout)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            release(self.app, result)
        return ms, value

    def warm(self) -> None:
        """Open this client's broker connection, result-backend connection and result
        subscription without sending a task: a web app's client is long-lived, and the first
        task a worker serves should not be charged with the client's own cold start."""
        with self.app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=3)
            queue = self.app.amqp.queues[self.app.conf.task_default_queue]
            producer.maybe_declare(queue)  # what the first publish to the queue does once
        self.app.backend.client.ping()
        result = self.app.AsyncResult(uuid.uuid4().hex)
        try:
            result.get(timeout=0.05)
        except Exception:  # nobody runs it: only the subscription matters
            pass
        finally:
            release(self.app, result)

    def sequential(
        self, name: str, jobs: list[tuple[list[Any], dict[str, Any]]], n: int
    ) -> list[float]:
        out = []
        for i in range(n):
            args, kwargs = jobs[i % len(jobs)]
            ms, _ = self.call(name, args, kwargs)
            out.append(ms)
        return out

    def close(self) -> None:
        close_app(self.app)


class Driver:
    """Keeps ``inflight`` tasks in flight with one thread: Celery publishes the tasks (no result
    backend on this client), and one Redis pub/sub subscription to ``celery-task-meta-*``
    receives the results the worker's Celery backend publishes. Lighter on the (shared) CPU than
    64 client threads each blocking in ``AsyncResult.get``."""

    def __init__(self, worker: WorkerProcess) -> None:
        import redis
        from celery import Celery

        self.app = Celery(broker=worker.redis_url)
        self.app.conf.update(
            task_default_queue=worker.queue, task_serializer="json", accept_content=["json"]
        )
        self.redis = redis.Redis.from_url(worker.redis_url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
        self.pubsub.psubscribe("celery-task-meta-*")
        wait_for(lambda: self.pubsub.get_message(timeout=0.5), 10, "the result subscription")

    def run(
        self, name: str, jobs: list[list[Any]], total: int, inflight: int, timeout: float = 300
    ) -> dict[str, Any]:
        """Send ``total`` tasks (args cycling through ``jobs``), ``inflight`` at a time."""
        sent: dict[str, float] = {}
        latencies: list[float] = []
        failures: list[str] = []
        next_i = 0
        producer = self.app.producer_pool.acquire(block=True)
        try:

            def send() -> None:
                nonlocal next_i
                task_id = uuid.uuid4().hex
                sent[task_id] = time.perf_counter()
                self.app.send_task(
                    name, args=jobs[next_i % len(jobs)], task_id=task_id, producer=producer
                )
                next_i += 1

            t0 = time.perf_counter()
            for _ in range(min(inflight, total)):
                send()
            deadline = time.monotonic() + timeout
            done = 0
            while done < total:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{done}/{total} results after {timeout} s")
                msg = self.pubsub.get_message(timeout=1.0)
                if not msg or msg.get("type") != "pmessage":
                    continue
                body = json.loads(msg["data"])
                status = body.get("status")
                task_id = body.get("task_id")
                if status not in ("SUCCESS", "FAILURE") or task_id not in sent:
                    continue
                latencies.append((time.perf_counter() - sent.pop(task_id)) * 1000)
                if status == "FAILURE":
                    failures.append(str(body.get("result"))[:200])
                done += 1
                if next_i < total:
                    send()
            elapsed = time.perf_counter() - t0
        finally:
            producer.release()
        return {
            "seconds": elapsed,
            "tasks": total,
            "failures": failures,
            "p50_ms": med(latencies),
            "p99_ms": pct(latencies, 99),
        }

    def close(self) -> None:
        with suppress(Exception):
            self.pubsub.close()
        with suppress(Exception):
            self.redis.close()
        with suppress(Exception):
            self.app.close()


# ---- processes and memory ------------------------------------------------------------------
def smaps(pid: int) -> dict[str, int]:
    from bench.helper import smaps_rollup

    return smaps_rollup(pid)


def tree_memory(root_pid: int) -> dict[str, Any]:
    """PSS of a process and its descendants (psutil), private memory per process, in MiB."""
    import psutil

    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    rows = []
    for p in procs:
        with suppress(psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            s = smaps(p.pid)
            rows.append(
                {
                    "pid": p.pid,
                    "role": "main" if p.pid == root_pid else "child",
                    "pss_mib": round(s.get("Pss", 0) / 1024, 1),
                    "private_mib": round(
                        (s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)) / 1024, 1
                    ),
                    "rss_mib": round(s.get("Rss", 0) / 1024, 1),
                }
            )
    return {
        "total_pss_mib": round(sum(r["pss_mib"] for r in rows), 1),
        "total_private_mib": round(sum(r["private_mib"] for r in rows), 1),
        "unique_resident_mib": unique_resident_mib([r["pid"] for r in rows]),
        "processes": rows,
    }


def private_breakdown(pid: int, top: int = 8) -> dict[str, float]:
    """Private memory (clean + dirty, MiB) of one process by mapping: [heap], anonymous, files."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anonymous]"
                if name.startswith("/"):
                    name = Path(name).name
            elif head in ("Private_Clean:", "Private_Dirty:"):
                sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v / 1024, 1) for k, v in ranked}


def _resident_pfns(pid: int) -> Any:
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pm:
        for line in maps:
            if "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            pm.seek(lo // page * 8)
            raw = pm.read((hi - lo) // page * 8)
            entries = np.frombuffer(raw, dtype=np.uint64)
            present = (entries >> np.uint64(63)) & np.uint64(1)
            pfn = entries & np.uint64((1 << 55) - 1)
            chunks.append(pfn[(present == 1) & (pfn != 0)])
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)


def unique_resident_mib(pids: list[int]) -> float | None:
    """Distinct physical pages resident in any of ``pids`` (each shared page counted once,
    whoever else maps it): a check on PSS that does not depend on other processes of the
    machine that map the same libraries. None where page frame numbers are not readable."""
    import numpy as np

    try:
        arrays = [_resident_pfns(pid) for pid in pids]
    except (OSError, ValueError):
        return None
    allp = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint64)
    if allp.size and not allp.any():
        return None
    return round(np.unique(allp).size * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def ready_time(
    worker: WorkerProcess,
    processes: int,
    t_launch: float,
    timeout: float = 180.0,
    interval: float = 0.02,
) -> dict[str, Any]:
    """Poll the registry snapshots in Redis until ``processes`` are READY. Returns seconds from
    launch to the poll that saw them, and to the last model's ``loaded_at`` (child's clock = same
    host clock), per process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError("worker exited:\n" + worker.log()[-3000:])
        snaps = [s for s in worker.snapshots() if s.get("node") == worker.node and s["ready"]]
        if len(snaps) >= processes:
            seen = time.time() - t_launch
            loaded = [
                max((m.get("loaded_at") or 0) for m in s["models"].values()) - t_launch
                for s in snaps
            ]
            return {"observed_s": seen, "loaded_s": loaded, "last_loaded_s": max(loaded)}
        time.sleep(interval)
    raise TimeoutError(
        f"{processes} processes not READY after {timeout} s:\n" + worker.log()[-2000:]
    )


class Stream:
    """A steady stream of sentiment.analyze for the reload section: ``inflight`` client threads,
    each sending one task and waiting for it (standard Celery client; Celery's result backends
    are per thread), recording every outcome with its send and answer times.

    One task per thread at a time on purpose: collecting several results in order with
    ``AsyncResult.get()`` makes the Redis result consumer wait a full 1 s drain interval for a
    result that had already arrived (it drains before it checks), which would show up here as
    1 s latencies that the workers did not cause."""

    def __init__(self, worker: WorkerProcess, inflight: int = 4) -> None:
        self.app = worker.app()
        self.inflight = inflight
        self.events: list[tuple[float, float, str, dict[str, Any] | None]] = []
        self.stop_event = threading.Event()
        self.threads = [
            threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(inflight)
        ]

    def run(self, slot: int) -> None:
        from bench.data import texts

        corpus = texts()
        i = slot
        while not self.stop_event.is_set():
            t_sent = time.time()
            result = self.app.send_task("sentiment.analyze", args=[corpus[i % len(corpus)]])
            i += self.inflight
            try:
                value = result.get(timeout=60)
                self.events.append((t_sent, time.time(), "ok", value))
            except Exception as exc:
                self.events.append((t_sent, time.time(), f"{type(exc).__name__}: {exc}", None))
            finally:
                release(self.app, result)

    def start(self) -> Stream:
        for thread in self.threads:
            thread.start()
        wait_for(lambda: len(self.events) >= 8, 60, "the task stream to get going")
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=120)
        close_app(self.app)


def task_runtimes_ms(worker: WorkerProcess, ids: list[str]) -> list[float]:
    """The worker's own runtime of each task (``Task NAME[ID] succeeded in Xs`` in its log)."""
    import re

    wanted = set(ids)
    found: dict[str, float] = {}
    for m in re.finditer(r"\[([0-9a-f-]{36})\] succeeded in ([0-9.e-]+)s", worker.log()):
        if m.group(1) in wanted:
            found[m.group(1)] = float(m.group(2)) * 1000
    return [found[i] for i in ids if i in found]


def tmpdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
