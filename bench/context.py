"""The run context every section gets (``Ctx``): the Redis, the log folder, worker and helper
processes, and measurement on a shared machine (quiet gates, and blocks that record what other
tenants used); statistics; the machine and commit of a run."""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.helper import ROOT, Helper

if TYPE_CHECKING:
    from harness import WorkerProcess

T = TypeVar("T")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
QUIET_CORES = 0.35  # other tenants' CPU use (cores) under which a measurement block may start
FOREIGN_CORES = 0.3  # other tenants' average CPU use during a block above which it is repeated


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return (
        ordered[min(max(1, math.ceil(q / 100 * len(ordered))), len(ordered)) - 1]
        if values
        else math.nan
    )


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def rnd(value: float, digits: int = 3) -> float:
    return round(value, digits) if value == value else value  # keep NaN


def loadavg() -> list[float]:
    with suppress(OSError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return []


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields), fields[3] + fields[4]  # total, idle + iowait


def cpu_seconds(root_pid: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system) of a process and its descendants, by PID; default: this
    benchmark process and everything it started (workers, helpers, drivers, Redis)."""
    import psutil

    root, out = psutil.Process(root_pid), {}
    for p in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            out[p.pid] = sum(p.cpu_times()[:2])  # user + system
    return out


class Block:
    """One measurement block: what other tenants of the machine used (in cores, averaged over
    the block) = all CPU busy time in /proc/stat minus the CPU time of this run's processes."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx, self.foreign_cores, self.clean, self.record = ctx, 0.0, True, {}

    def __enter__(self) -> Block:
        self.ctx.quiet()
        self.ours0, self.stat0, self.t0 = cpu_seconds(), _cpu_times(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        stat1, wall = _cpu_times(), max(1e-3, time.monotonic() - self.t0)
        ours = sum(v - self.ours0.get(pid, 0.0) for pid, v in cpu_seconds().items())
        busy = ((stat1[0] - self.stat0[0]) - (stat1[1] - self.stat0[1])) / os.sysconf("SC_CLK_TCK")
        self.foreign_cores = max(0.0, busy - ours) / wall
        self.clean = self.foreign_cores <= FOREIGN_CORES
        foreign = round(self.foreign_cores, 3)
        self.record = {"wall_s": round(wall, 3), "foreign_cores": foreign, "clean": self.clean}
        self.ctx.blocks.append(self.record)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    info = {}
    for path, prefix in (("/proc/cpuinfo", "model name"), ("/proc/meminfo", "MemTotal:")):
        with suppress(OSError, StopIteration):
            lines = Path(path).read_text().splitlines()
            info[prefix] = next(x.split(":", 1)[1].strip() for x in lines if x.startswith(prefix))
    versions = {}
    packages = "torch transformers celery kombu redis prophet statsmodels scikit-learn numpy"
    for pkg in packages.split():
        with suppress(Exception):
            versions[pkg] = version(pkg)
    gpu = None
    with suppress(Exception):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=5)
        gpu = out.stdout.strip() or None
    memory = round(int(info.get("MemTotal:", "0 kB").split()[0]) / 2**20, 1)
    return {"nproc": CORES, "cpu_model": info.get("model name", "?"), "memory_gib": memory} | {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": gpu,
    }


def git_commit() -> dict[str, Any]:
    import hashlib

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    product = ["shared", "tasks", "workers", "celeryconfig.py"]
    with suppress(Exception):
        diff = git("diff", "HEAD", "--", *product)
        return {
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain")),
            "product_code_uncommitted_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16]
            if diff
            else None,
            "product_files_changed": git("diff", "--name-only", "HEAD", "--", *product).split(),
        }
    return {"commit": None, "dirty": None}


@dataclass
class Ctx:
    """One benchmark run: its Redis, log folder, mode, quiet gates and measurement blocks."""

    redis_url: str
    logs: Path
    quick: bool
    gate_s: float | None = None  # most seconds one section may wait for quiet (None: by mode)
    gates: list[dict[str, float]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    gate_budget_s: float = 120.0
    retry_budget: int = 30  # most measurement blocks one section may repeat
    _gate_spent: float = 0.0

    def new_section(self) -> None:
        self._gate_spent = 0.0
        self.gate_budget_s = self.gate_s or (5.0 if self.quick else 120.0)
        self.retry_budget = 2 if self.quick else 30

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

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
            b.record.update(attempt=attempt, kept=False)
            attempts.append((b, value))
            if b.clean or self.retry_budget <= 0:
                break
            if attempt < tries - 1:
                self.retry_budget -= 1
        best, value = min(attempts, key=lambda bv: bv[0].foreign_cores)
        best.record["kept"] = True
        return value

    def quiet(self, threshold: float = QUIET_CORES) -> float:
        """Wait (bounded) until the rest of the machine uses at most ``threshold`` cores.

        Called between measurement blocks, when this run's own processes are idle, so what
        /proc/stat shows busy is other tenants of the (shared) machine. Returns the busy cores
        of the last sample; every gate is recorded (``gates``) for the results file."""
        limit = max(0.0, min(1.0 if self.quick else 20.0, self.gate_budget_s - self._gate_spent))
        t0 = time.monotonic()
        while True:
            total0, idle0 = _cpu_times()
            time.sleep(0.25)
            total1, idle1 = _cpu_times()
            spent = max(1, total1 - total0)
            busy, waited = (spent - (idle1 - idle0)) / spent * CORES, time.monotonic() - t0
            if busy <= threshold or waited >= limit:
                break
        self._gate_spent += waited
        self.gates.append({"busy_cores": round(busy, 2), "waited_s": round(waited, 2)})
        return busy

    def summaries(self, gates: int, blocks: int) -> dict[str, Any]:
        """What the gates and blocks since these counts waited and saw (the results file)."""
        g, b, out = self.gates[gates:], self.blocks[blocks:], {"quiet_gates": {}, "blocks": {}}
        if g:
            out["quiet_gates"] = {
                "gates": len(g),
                "waited_s": round(sum(x["waited_s"] for x in g), 1),
                "median_busy_cores_at_start": round(med([x["busy_cores"] for x in g]), 2),
                "started_busy": sum(x["busy_cores"] > QUIET_CORES for x in g),
            }
        if b:
            out["blocks"] = {
                "blocks": len(b),
                "repeated": sum(x.get("attempt", 0) > 0 for x in b),
                "contaminated_kept": sum(not x["clean"] for x in b if x.get("final", True)),
                "median_foreign_cores": round(med([x["foreign_cores"] for x in b]), 3),
                "max_foreign_cores": round(max(x["foreign_cores"] for x in b), 2),
            }
        return out

    def worker(
        self,
        *,
        concurrency: int,
        env: dict[str, str],
        pool: str = "prefork",
        app: str = "workers.app",
        **kw: Any,
    ) -> WorkerProcess:
        """A worker node (not started) of the Celery ``app``, with its own queue and prefix
        (``prefix``, ``node``: as WorkerProcess)."""
        from harness import WorkerProcess

        env = {"HEARTBEAT_SECONDS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
        worker = WorkerProcess(
            self.redis_url, concurrency=concurrency, pool=pool, env=env, log_dir=self.logs, **kw
        )
        worker.args[worker.args.index("workers.app")] = app
        return worker

    @contextmanager
    def running(
        self, worker: WorkerProcess, ready_timeout: float = 180.0, *, wait: bool = True
    ) -> Iterator[WorkerProcess]:
        """Start ``worker``, wait for every serving process READY (``wait=False``: later, with
        ``ctx.ready``); always stop it by PID."""
        worker.start()
        try:
            if wait:
                self.ready(worker, ready_timeout)
            yield worker
        finally:
            worker.stop()

    @contextmanager
    def launched(
        self, worker: WorkerProcess, processes: int, timeout: float = 180.0
    ) -> Iterator[dict[str, Any]]:
        """Start ``worker``; yield ``ready_time`` (seconds from launch to ``processes`` READY);
        always stop it by PID."""
        t_launch = time.time()
        worker.start()
        try:
            yield ready_time(worker, processes, t_launch, timeout)
        finally:
            worker.stop()

    def ready(self, worker: WorkerProcess, timeout: float = 180.0) -> None:
        threads = worker.args[worker.args.index("--pool") + 1] == "threads"
        worker.wait_ready(1 if threads else None, timeout=timeout)

    @contextmanager
    def helper(self, manifest: Path, *, threads: int, **kwargs: Any) -> Iterator[Helper]:
        """A ``bench.helper`` process (see ``Helper``), always stopped by PID."""
        helper = Helper(manifest, threads=threads, logs=self.logs, **kwargs)
        try:
            yield helper
        finally:
            helper.close()


def ready_time(
    worker: WorkerProcess, processes: int, t_launch: float, timeout: float = 180.0
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
                max(m.get("loaded_at") or 0 for m in s["models"].values()) - t_launch for s in snaps
            ]
            return {"observed_s": seen, "loaded_s": loaded, "last_loaded_s": max(loaded)}
        time.sleep(0.02)
    raise TimeoutError(
        f"{processes} processes not READY after {timeout} s:\n{worker.log()[-2000:]}"
    )


def task_runtimes_ms(worker: WorkerProcess, ids: list[str]) -> list[float]:
    """The worker's own runtime of each task (``Task NAME[ID] succeeded in Xs`` in its log)."""
    found = re.findall(r"\[([0-9a-f-]{36})\] succeeded in ([0-9.e-]+)s", worker.log())
    runtimes = {task_id: float(s) * 1000 for task_id, s in found}
    return [runtimes[i] for i in ids if i in runtimes]
