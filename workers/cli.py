"""The ``modelworkers`` command: run workers (``up``), try them (``demo``), watch them (``status``,
``health``), reload their models (``reload``)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from shared.queues import QueueStats
from shared.records import ProcessSnapshot
from shared.settings import ENV_PREFIX, Settings, get_settings
from shared.state import fleet_summary, read_node_snapshots, read_snapshots
from shared.urls import broker_connection_url, redact, redis_client, redis_connection_url
from workers.broker import queue_reader
from workers.embedded import EmbeddedRedis

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()  # tables and progress; JSON is printed plain (print_json), never through Rich
log = logging.getLogger("modelworkers.cli")

Pool = Literal["prefork", "solo", "threads"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelworkers")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"modelworkers {package_version()}")
        raise typer.Exit(0)


@cli.callback()
def _main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log what the command does (DEBUG) on stderr."
    ),
    _version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("modelworkers")
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        log.debug("modelworkers %s, Python %s", package_version(), sys.version.split()[0])


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Exit 2 with the pip command that installs ``extra`` when ``module`` cannot be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        say(
            f"{purpose} needs {module}, which is not installed: "
            f"pip install 'modelworkers[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        )
        raise typer.Exit(2) from None


def say(message: str) -> None:
    """A line for the operator on stderr, printed verbatim (no markup, no wrapping)."""
    typer.echo(message, err=True)


def print_json(data: Any) -> None:
    """JSON on stdout as is: a pipe into a JSON parser reads exactly this."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def child_env(settings: Settings) -> dict[str, str]:
    """The environment of the processes a command starts: this one's, plus the settings this
    command decided (an embedded Redis's URL, the demo's prefix and queue)."""
    env = dict(os.environ)
    if settings.redis_url:
        env[ENV_PREFIX + "REDIS_URL"] = settings.redis_url
    env[ENV_PREFIX + "KEY_PREFIX"] = settings.key_prefix
    env[ENV_PREFIX + "TASK_QUEUE"] = settings.task_queue
    for name in ("REDIS_URL", "KEY_PREFIX", "TASK_QUEUE"):
        env.pop(name, None)  # read already (with its warning); the children get the new names
    return env


# ---- starting and stopping what we run ------------------------------------------------------
@contextmanager
def redis_for_run(settings: Settings) -> Iterator[Settings]:
    """``settings`` when REDIS_URL is set; else a copy pointing at an embedded Redis that runs
    for as long as the command does."""
    if settings.redis_url:
        log.debug("Redis: %s", redact(redis_connection_url(settings)))
        yield settings
        return
    server = EmbeddedRedis()
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        say(f"MODELWORKERS_REDIS_URL is not set, and no embedded Redis could be started: {exc}")
        raise typer.Exit(2) from None
    try:
        pid = server.proc.pid if server.proc else "?"
        say(
            f"MODELWORKERS_REDIS_URL is not set: started an embedded Redis at {server.url} "
            f"(pid {pid})"
        )
        yield settings.model_copy(update={"redis_url": server.url})
    finally:
        server.close()


def worker_command(
    concurrency: int,
    pool: str,
    loglevel: str,
    node: str,
    queue: str | None = None,
    events: bool = False,
) -> list[str]:
    """The `celery worker` command line that `up`, `demo` (and the tests) run, without gossip
    and mingle. ``events``:
    task events from the start (-E), whatever TASK_EVENTS says (Flower enables them anyway)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "-n",
        node,
        "-Q",
        queue or get_settings().task_queue,
        # Gossip makes every node consume every other node's heartbeats (Redis traffic grows
        # with the square of the nodes), mingle asks every node at each start; nothing here
        # uses either (docs/operations.md, fleet scale).
        "--without-gossip",
        "--without-mingle",
        *(["-E"] if events else []),
    ]


def stop_process(proc: subprocess.Popen[Any], name: str, timeout: float = 20.0) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL the process group after ``timeout``."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"{name} (pid {proc.pid}) did not stop in {timeout:g} s: killing it")
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    # Own process group: Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def flower_command(port: int) -> list[str]:
    """Flower on loopback. Its basic auth comes from FLOWER_BASIC_AUTH in its environment
    (:func:`flower_env`; Flower reads FLOWER_* variables itself), never from its command line,
    where any user of the machine could read it (``ps``)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
    ]


def flower_env(env: dict[str, str], basic_auth: str) -> dict[str, str]:
    """``env`` with Flower's credentials (``user:password``; its HTTP API needs them too)."""
    return {**env, "FLOWER_BASIC_AUTH": basic_auth}


def wait_ready(
    settings: Settings,
    processes: int,
    timeout: float,
    *,
    watch: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll the registry in Redis until ``processes`` pool processes report ready."""
    client = redis_client(settings)
    deadline = time.monotonic() + timeout
    not_ready: list[Any] = []
    with console.status("waiting for every pool process to load its models...") as status:
        while time.monotonic() < deadline:
            if watch is not None and watch.poll() is not None:
                raise RuntimeError(f"the worker exited with code {watch.returncode}")
            with suppress(Exception):
                summary = fleet_summary(read_snapshots(client, settings.key_prefix))
                not_ready = [p.model_dump() for p in summary.not_ready]
                status.update(f"{summary.ready_processes}/{processes} pool processes ready")
                if summary.ready_processes >= processes:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"pool processes not ready after {timeout:g} s: {not_ready}")


# ---- commands -------------------------------------------------------------------------------
@cli.command()
def up(
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Pool processes."),
    pool: Pool = typer.Option(None, help="Pool type (default: MODELWORKERS_WORKER_POOL)."),
    flower: bool = typer.Option(False, "--flower", help="Also start Flower (basic auth on)."),
    loglevel: LogLevel = typer.Option("INFO", case_sensitive=False, help="Worker log level."),
    node: str = typer.Option("modelworkers@%h", "--node", "-n", help="Celery node name."),
) -> None:
    """Start Redis (embedded unless REDIS_URL is set) and a worker, in the foreground."""
    concurrency = concurrency or get_settings().worker_concurrency
    pool = pool or get_settings().worker_pool
    if flower:
        require_extra("flower", "flower", "modelworkers up --flower")
    with redis_for_run(get_settings()) as settings:
        broker, redis_url = broker_connection_url(settings), redis_connection_url(settings)
        if broker == redis_url:
            console.print(f"broker and registry: {redact(redis_url)}")
        else:
            console.print(f"broker: {redact(broker)}; results and registry: {redact(redis_url)}")
        env = child_env(settings)
        procs: list[tuple[str, subprocess.Popen[Any]]] = []
        command = worker_command(concurrency, pool, loglevel, node, settings.task_queue, flower)
        worker = spawn(command, env=env)
        procs.append(("worker", worker))
        if flower:
            auth = (
                settings.flower_basic_auth.get_secret_value()
                if settings.flower_basic_auth
                else f"admin:{secrets.token_urlsafe(12)}"
            )
            flower_proc = spawn(flower_command(settings.flower_port), env=flower_env(env, auth))
            procs.append(("flower", flower_proc))
            user = auth.split(":", 1)[0]
            console.print(
                f"Flower: http://127.0.0.1:{settings.flower_port} (user {user!r}; "
                "password from FLOWER_BASIC_AUTH"
                + (
                    ""
                    if settings.flower_basic_auth
                    else f", generated for this run: {auth.split(':', 1)[1]}"
                )
                + ")"
            )
        stopping = False

        def _stop(signum: int, _frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
        code = 0
        try:
            while not stopping:
                for name, proc in procs:
                    if proc.poll() is not None:
                        say(f"{name} exited with code {proc.returncode}")
                        stopping, code = True, proc.returncode or 1
                time.sleep(0.2)
        finally:
            console.print("stopping...")
            for name, proc in reversed(procs):
                stop_process(proc, name)
    raise typer.Exit(code)


DEMO_TEXTS = [
    "A gorgeous, witty and moving film; I loved every minute of it.",
    "The plot is dull, the acting wooden and the ending a mess.",
    "Service was quick and the staff were lovely.",
    "I want my money back, this product broke after a day.",
]


def demo_jobs() -> list[tuple[str, str, list[Any], dict[str, Any]]]:
    """Real jobs on data that ships with the installed packages."""
    import pandas as pd
    from sklearn.datasets import load_iris
    from statsmodels.datasets import co2, nile

    monthly = co2.load_pandas().data["co2"].resample("MS").mean().interpolate().iloc[-120:]
    prophet_series = {
        "ds": [d.date().isoformat() for d in monthly.index],
        "y": [round(float(v), 3) for v in monthly],
    }
    nile_y = [float(v) for v in nile.load_pandas().data["volume"]]
    nile_ds = [
        d.date().isoformat() for d in pd.date_range("1871-01-01", periods=len(nile_y), freq="YS")
    ]
    iris = load_iris().data[::5].round(2).tolist()
    customers = [[12.0, 24.0, 1800.0, 40.0], [200.0, 2.0, 90.0, 6.0], [45.0, 8.0, 420.0, 18.0]]
    return [
        ("sentiment", "sentiment.analyze", [DEMO_TEXTS[0]], {}),
        ("sentiment", "sentiment.analyze_batch", [DEMO_TEXTS], {}),
        ("forecast", "forecast.prophet", [prophet_series, 6], {"frequency": "MS"}),
        ("forecast", "forecast.arima", [{"ds": nile_ds, "y": nile_y}, 5], {"order": [1, 1, 1]}),
        ("forecast", "forecast.predict", ["co2_prophet", 6], {}),
        ("forecast", "forecast.predict", ["sunspots_arima", 5], {}),
        ("clustering", "clustering.assign", [customers], {}),
        ("clustering", "clustering.fit", [iris, 3], {}),
    ]


def _short(result: Any) -> str:
    if isinstance(result, list):
        return ", ".join(f"{r['label']} {r['score']:.2f}" for r in result)
    if "label" in result:
        return f"{result['label']} ({result['score']:.2f}, {result['model']}@{result['version']})"
    if "yhat" in result:
        ys = ", ".join(f"{v:.1f}" for v in result["yhat"][:4])
        first = (result.get("ds") or ["-"])[0][:10]
        return f"from {first}: {ys}... ({result.get('model')})"
    if "centers" in result:
        return f"labels {result['labels'][:8]}... inertia {result['inertia']:.1f}"
    return f"labels {result['labels']} ({result['model']}@{result['version']})"


@cli.command()
def demo(
    concurrency: int = typer.Option(2, "--concurrency", "-c", help="Pool processes."),
    warm_runs: int = typer.Option(10, help="Warm repeats of each job for the latency figure."),
    timeout: float = typer.Option(180.0, help="Seconds to wait for the workers."),
) -> None:
    """Start what is needed, run real jobs of every family, print results, latencies, registry."""
    # The demo's own registry prefix and queue: in a shared Redis it never touches (or serves)
    # a live fleet's keys and tasks.
    demo_id = f"modelworkers-demo-{secrets.token_hex(3)}"
    base = get_settings().model_copy(update={"key_prefix": demo_id, "task_queue": demo_id})
    with redis_for_run(base) as settings:
        from workers.app import app

        app.conf.broker_url = broker_connection_url(settings)
        app.conf.result_backend = redis_connection_url(settings)
        app.conf.task_default_queue = demo_id
        client = redis_client(settings)
        url = redact(redis_connection_url(settings))
        console.print(f"broker and registry: {url} (demo queue and prefix {demo_id})")
        log_path = Path(tempfile.gettempdir()) / "modelworkers-demo-worker.log"
        log_file = log_path.open("wb")
        worker = spawn(
            worker_command(concurrency, "prefork", "INFO", "demo@%h", demo_id),
            env=child_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        console.print(f"worker log: {log_path}")
        try:
            t0 = time.perf_counter()
            wait_ready(settings, concurrency, timeout, watch=worker)
            console.print(
                f"{concurrency} pool processes READY {time.perf_counter() - t0:.1f} s "
                "after the worker was launched"
            )
            table = Table(title="demo jobs (latency = end-to-end through Celery and Redis)")
            for col in ("task", "result", "first ms", "warm p50 ms"):
                table.add_column(col, overflow="fold")
            for _family, name, args, kwargs in demo_jobs():
                first_t = time.perf_counter()
                result = app.send_task(name, args=args, kwargs=kwargs).get(timeout=60)
                first_ms = (time.perf_counter() - first_t) * 1000
                warm = []
                for _ in range(warm_runs):
                    t = time.perf_counter()
                    app.send_task(name, args=args, kwargs=kwargs).get(timeout=60)
                    warm.append((time.perf_counter() - t) * 1000)
                table.add_row(
                    name, Text(_short(result)), f"{first_ms:.1f}", f"{statistics.median(warm):.1f}"
                )
            console.print(table)
            bad = app.send_task("sentiment.analyze", args=[""])
            with suppress(Exception):
                bad.get(timeout=30, propagate=False)
            console.print(Text(f"bad input -> {bad.state}: {bad.result!r}"))
            print_status(counted_snapshots(client, settings, time.time()))
        finally:
            stop_process(worker, "worker")
            log_file.close()
            with suppress(Exception):  # leave nothing of the demo behind in a shared Redis
                client.delete(demo_id, *client.scan_iter(match=f"{demo_id}:*"))
            app.close()


def counted_snapshots(client: Any, settings: Settings, since: float) -> list[ProcessSnapshot]:
    """The snapshots once every process has published the calls made before ``since`` (a
    wall-clock time; they publish on their heartbeat): read until each one's heartbeat is later,
    for at most two heartbeats."""
    deadline = time.monotonic() + 2 * settings.heartbeat_seconds + 1
    while True:
        snaps = read_snapshots(client, settings.key_prefix)
        fresh = all(s.heartbeat is not None and s.heartbeat > since for s in snaps)
        if (snaps and fresh) or time.monotonic() > deadline:
            return snaps
        time.sleep(0.2)


def print_status(snaps: list[ProcessSnapshot]) -> None:
    """One row per (process, model); errors are listed in full under the table."""
    summary = fleet_summary(snaps)
    state = "READY" if summary.ready else "NOT READY"
    table = Table(title=f"model registry: {summary.processes} pool processes, {state}")
    columns = ("node", "pid", "model", "version", "status", "load s", "MiB", "calls", "p95 ms")
    for col in columns:
        table.add_column(col, no_wrap=col in ("model", "node"))
    problems = []
    for snap in snaps:
        node = snap.node or snap.host
        for name, m in snap.models.items():
            p95, load = m.latency_p95_ms, m.load_seconds
            status = m.status + ("*" if m.reload_error else "")
            shares = {v: s.weight for v, s in m.versions.items() if s.weight}
            version = (
                " / ".join(f"{v} {w}%" for v, w in shares.items()) if len(shares) > 1 else m.version
            )
            memory = sum(s.memory_mb or 0.0 for s in m.versions.values())
            calls = str(sum(s.calls for s in m.versions.values()) or m.calls)
            table.add_row(
                Text(node),
                str(snap.pid),
                Text(name),
                Text(version),
                status + (f" (evicted {m.evictions}x)" if m.evictions else ""),
                f"{load:.2f}" if load is not None else "-",
                f"{memory:.0f}" if memory else "-",
                calls,
                f"{p95:.1f}" if p95 is not None else "-",
            )

            for kind, text in (("error", m.error), ("reload_error", m.reload_error)):
                if text:
                    problems.append(f"{node} pid {snap.pid} {name} {kind}: {text}")
    console.print(table)
    for snap in snaps:
        if snap.memory_budget_mb:
            console.print(
                f"{snap.node} pid {snap.pid}: models use {snap.models_memory_mb:.0f} MiB of a "
                f"{snap.memory_budget_mb:.0f} MiB budget"
            )
    for line in problems:
        console.print(Text(line, style="red"), soft_wrap=True)

    if any(m.reload_error for s in snaps for m in s.models.values()):
        console.print("* serving the previous version after a failed reload")


def read_fleet(settings: Settings, node: str | None = None) -> list[ProcessSnapshot]:
    """Every live process's snapshot (``node``'s only, if given); exit 2 with a clear line when
    Redis cannot be read."""
    log.debug(
        "reading the registry at %s, prefix %s",
        redact(redis_connection_url(settings)),
        settings.key_prefix,
    )
    try:
        client = redis_client(settings)
        if node:
            return read_node_snapshots(client, settings.key_prefix, node)
        return read_snapshots(client, settings.key_prefix)
    except Exception as exc:
        say(f"cannot read the registry from Redis: {redact(str(exc))}")
        raise typer.Exit(2) from None


def fleet_queues(settings: Settings, snaps: list[ProcessSnapshot]) -> list[str]:
    """The queues the fleet consumes: TASK_QUEUE and the queues its models' files name."""
    named = {m.queue for s in snaps for m in s.models.values() if m.queue}
    return sorted({settings.task_queue} | named)


def read_queues(settings: Settings, queues: list[str]) -> list[QueueStats] | None:
    """Depth and oldest waiting message of each queue (None when the broker cannot be read)."""
    import celeryconfig  # the workers' transport options (priority steps, key prefix)

    options = celeryconfig.broker_transport_options
    try:
        return queue_reader(settings, transport_options=options)(queues)
    except Exception as exc:
        say(f"cannot read the queues from the broker: {redact(str(exc))}")
        return None


@cli.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead.")) -> None:
    """Every pool process and its models, from the registry in Redis; then each queue the fleet
    consumes: messages waiting, and how long the oldest has waited."""
    settings = get_settings()
    snaps = read_fleet(settings)
    queues = read_queues(settings, fleet_queues(settings, snaps))
    if as_json:
        print_json(
            {
                "summary": fleet_summary(snaps).model_dump(mode="json"),
                "processes": [s.model_dump(mode="json") for s in snaps],
                "queues": [
                    {
                        "queue": q.queue,
                        "depth": q.depth,
                        "oldest_age_seconds": None
                        if q.oldest_age_seconds is None
                        else round(q.oldest_age_seconds, 3),
                    }
                    for q in queues or []
                ],
            }
        )
        return
    if not snaps:
        console.print(
            "no live pool processes (none has published within MODELWORKERS_STATE_TTL_SECONDS)"
        )
    else:
        print_status(snaps)
    for q in queues or []:
        age = (
            "oldest waiting not known (RabbitMQ)"
            if q.oldest_age_seconds is None
            else f"oldest waiting {q.oldest_age_seconds:.1f} s (at least)"
        )
        console.print(Text(f"queue {q.queue}: {q.depth} waiting, {age}"))


@cli.command()
def health(
    min_processes: int = typer.Option(1, help="Required models must be READY in this many."),
    node: str = typer.Option(None, help="Only this node's processes (a container check)."),
    live: bool = typer.Option(
        False,
        "--live",
        help="Liveness instead: exit 0 while a process (of --node) publishes, and when Redis "
        "cannot be read (restarting a worker does not cure Redis); 1 when none does.",
    ),
) -> None:
    """Exit 0 when the fleet is ready, 1 when not, 2 when Redis cannot be read. Prints one JSON
    object (plain, whatever the terminal width)."""
    settings = get_settings()
    if live:
        try:
            client = redis_client(settings)
            if node:
                mine = read_node_snapshots(client, settings.key_prefix, node)
            else:
                mine = read_snapshots(client, settings.key_prefix)
        except Exception as exc:
            say(f"cannot read the registry from Redis: {redact(str(exc))}; counted as alive")
            sys.stdout.write('{"alive":true,"processes":null}\n')
            raise typer.Exit(0) from None
        sys.stdout.write(json.dumps({"alive": bool(mine), "processes": len(mine)}) + "\n")
        raise typer.Exit(0 if mine else 1)
    snaps = read_fleet(settings, node)
    summary = fleet_summary(snaps, min_processes=min_processes)
    sys.stdout.write(
        summary.model_dump_json(include={"ready", "processes", "ready_processes", "not_ready"})
        + "\n"
    )
    raise typer.Exit(0 if summary.ready else 1)


def run_request(
    action: str,
    *,
    models: list[str] | None = None,
    version: str | None = None,
    weights: dict[str, int] | None = None,
    nodes: list[str] | None = None,
    wait: bool = True,
    timeout: float = 120.0,
    as_json: bool = False,
    rollback: str | None = None,
) -> None:
    """Send a control request (or a rollback of ``rollback``), wait for a reply from every
    process it reaches, print them; exit 0 when all succeeded, 1 when any failed or did not
    answer, 2 when it was refused or Redis could not be reached."""
    from redis.exceptions import NoPermissionError

    from shared.errors import ModelWorkersError
    from shared.manifest import manifest_from_settings
    from shared.reload import collect_replies, send_request, send_rollback

    settings = get_settings()
    client = redis_client(settings)
    try:
        manifest = manifest_from_settings(settings)
        if rollback is not None:
            request = send_rollback(client, settings.key_prefix, manifest, rollback)
        else:
            request = send_request(
                client,
                settings.key_prefix,
                manifest,
                action=action,
                models=models,
                version=version,
                weights=weights,
                nodes=nodes,
            )
    except ModelWorkersError as exc:
        say(f"refused: {exc}")
        raise typer.Exit(2) from None
    except NoPermissionError as exc:  # an ACL user without the admin role's rights
        say(f"refused by Redis, this Redis user may not send control requests: {exc}")
        raise typer.Exit(2) from None
    except Exception as exc:
        say(f"cannot reach Redis: {redact(str(exc))}")
        raise typer.Exit(2) from None
    expected = len(request.expected)
    if not wait:
        if as_json:
            print_json(request.model_dump(mode="json"))
        else:
            console.print(f"{request.action} {request.id} sent to {expected} processes")
        return
    with console.status(f"{request.action}...") as progress:
        outcome = collect_replies(
            client,
            settings.key_prefix,
            request,
            timeout=timeout,
            progress=lambda done, total: progress.update(f"{done}/{total} processes answered"),
        )
    if as_json:
        print_json(outcome.model_dump(mode="json"))
    else:
        title = f"{request.action} {request.id[:8]}: {', '.join(request.models or [])}"
        table = Table(title=title)
        for col in ("node", "pid", "model", "old", "new", "seconds", "result"):
            table.add_column(col, overflow="fold")
        for reply in outcome.replies:
            for r in reply.results:
                table.add_row(
                    Text(reply.node),
                    str(reply.pid),
                    Text(str(r.model)),
                    Text(str(r.old_version)),
                    Text(str(r.new_version)),
                    f"{r.seconds:.2f}" if r.seconds else "-",
                    Text("ok") if r.ok else Text(str(r.error), style="red"),
                )
        for miss in outcome.missing:
            table.add_row(
                *(Text(str(miss.node)), str(miss.pid), "-", "-", "-", "-"),
                Text(miss.error, style="red"),
            )
        console.print(table)
    if not expected:
        say(f"no live pool process matched: nothing to {request.action}")
    raise typer.Exit(0 if outcome.ok else 1)


DESTINATION = typer.Option(None, "--destination", "-d", help="Node name(s) (default: all).")
WAIT = typer.Option(True, "--wait/--no-wait", help="Wait for every process's result.")
TIMEOUT = typer.Option(120.0, help="Seconds to wait for the replies.")
JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


@cli.command()
def reload(
    model: str = typer.Argument(None, help="Model name from the repository (default: all)."),
    version: str = typer.Option(None, "--version", help="A version listed in the repository."),
    old_version: str = typer.Option(
        None, "-v", hidden=True, help="Deprecated spelling of --version (kept for a release)."
    ),
    destination: list[str] = DESTINATION,
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Reload models in every pool process (load beside, swap, free); exit 1 if any failed."""
    if old_version is not None:
        say("-v is deprecated for reload: use --version")
    run_request(
        "reload",
        models=[model] if model else None,
        version=version or old_version,
        nodes=destination or None,
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


@cli.command()
def load(
    model: str = typer.Argument(..., help="A model of the repository (also one added since)."),
    version: str = typer.Option(None, "--version", help="Default: the model file's default."),
    destination: list[str] = DESTINATION,
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Load a model in every pool process (or bring an unloaded one back); its requests go to
    this version. Processes started later load it too."""
    run_request(
        "load",
        models=[model],
        version=version,
        nodes=destination or None,
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


@cli.command()
def unload(
    model: str = typer.Argument(..., help="A loaded model."),
    destination: list[str] = DESTINATION,
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Unload a model in every pool process once its running tasks end (it then answers
    ModelNotReady, or its fallback). Processes started later do not load it; `load` brings it
    back."""
    run_request(
        "unload",
        models=[model],
        nodes=destination or None,
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


def _weights(pairs: list[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for pair in pairs:
        version, sep, weight = pair.rpartition("=")
        if not sep or not version or not weight.isdigit():
            say(f"{pair!r}: expected VERSION=WEIGHT, e.g. 1.0.0=90")
            raise typer.Exit(2)
        weights[version] = int(weight)
    return weights


@cli.command()
def split(
    model: str = typer.Argument(..., help="A model of the repository."),
    shares: list[str] = typer.Argument(..., help="VERSION=WEIGHT for each version, e.g. 1.0.0=90"),
    destination: list[str] = DESTINATION,
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Serve several versions of a model at once, each with its share of the requests (an A/B
    split); versions left out are unloaded. A request's `key` always gets the same version."""
    run_request(
        "split",
        models=[model],
        weights=_weights(shares),
        nodes=destination or None,
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


@cli.command()
def promote(
    model: str = typer.Argument(..., help="A model of the repository."),
    version: str = typer.Argument(..., help="The version that gets every request."),
    destination: list[str] = DESTINATION,
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Give one version every request of a model; its other versions are unloaded."""
    run_request(
        "split",
        models=[model],
        weights={version: 100},
        nodes=destination or None,
        wait=wait,
        timeout=timeout,
        as_json=as_json,
    )


@cli.command()
def rollback(
    model: str = typer.Argument(..., help="A model whose state changed (reload, split, ...)."),
    wait: bool = WAIT,
    timeout: float = TIMEOUT,
    as_json: bool = JSON,
) -> None:
    """Put a model back in the fleet-wide state it had before its last change (a version, a
    split, or unloaded)."""
    run_request("rollback", rollback=model, wait=wait, timeout=timeout, as_json=as_json)


# ---- models: the repository ------------------------------------------------------------------
models_cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The model repository (MODELWORKERS_MODEL_REPOSITORY): list, verify, hash, add. No "
    "worker needed.",
)
cli.add_typer(models_cli, name="models")


def _manifest(settings: Settings) -> Any:
    from shared.errors import ManifestError
    from shared.manifest import manifest_from_settings

    try:
        return manifest_from_settings(settings)
    except ManifestError as exc:
        say(str(exc))
        raise typer.Exit(2) from None


@models_cli.command("list")
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON instead.")) -> None:
    """What a worker would load: every model and version of the repository (* = loads at
    start), then the model files it skips and the artifacts nobody lists."""
    manifest = _manifest(get_settings())
    active = {s.key for s in manifest.active()}
    if as_json:
        print_json(
            {
                "repository": str(manifest.path),
                "models": [
                    {**s.model_dump(exclude={"location"}), "default": s.key in active}
                    for s in manifest.specs
                ],
                "problems": manifest.problems,
                "unlisted": manifest.unlisted,
            }
        )
        return
    table = Table(title=f"models in {manifest.path}")
    for col in ("model", "version", "family", "required", "lazy", "fallback", "queue", "path"):
        table.add_column(col, overflow="fold")
    for spec in manifest.specs:
        table.add_row(
            Text(spec.name),
            Text(spec.version + (" *" if spec.key in active else "")),
            Text(spec.implementation or spec.family),
            "yes" if spec.required else "no",
            "yes" if spec.lazy else "no",
            Text(spec.fallback or "-"),
            Text(spec.queue or "-"),
            Text(spec.path or "-"),
        )
    console.print(table)
    for name, problem in manifest.problems.items():
        console.print(Text(f"skipped {name}: {problem}", style="red"), soft_wrap=True)
    for path in manifest.unlisted:
        console.print(Text(f"not listed by any model file (never loaded): {path}"))


@models_cli.command("verify")
def models_verify(
    names: list[str] = typer.Argument(None, help="Only these models (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead."),
) -> None:
    """Check every artifact against its sha256, and that every family can be imported, without
    a worker. Exit 0 when all pass, 1 when any fails, 2 when the repository cannot be read."""
    from shared.families import family_class
    from shared.manifest import verify_artifact

    manifest = _manifest(get_settings())
    checks = []
    for spec in manifest.specs:
        if names and spec.name not in names:
            continue
        error = None
        try:
            family_class(spec.family, spec.implementation)
            if spec.path:
                verify_artifact(spec)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        checks.append(
            {"model": spec.name, "version": spec.version, "ok": error is None, "error": error}
        )
    problems = {k: v for k, v in manifest.problems.items() if not names or k in names}
    ok = all(c["ok"] for c in checks) and not problems
    if as_json:
        print_json({"ok": ok, "checks": checks, "problems": problems})
    else:
        for check in checks:
            what = "ok" if check["ok"] else f"FAILED {check['error']}"
            typer.echo(f"{check['model']}@{check['version']}: {what}")
        for name, problem in problems.items():
            typer.echo(f"{name}: model file skipped: {problem}")
    raise typer.Exit(0 if ok else 1)


@models_cli.command("hash")
def models_hash(path: Path = typer.Argument(..., help="An artifact: a file or a folder.")) -> None:
    """The sha256 of an artifact, as a model file lists it (a folder: over its files)."""
    from shared.manifest import artifact_sha256

    try:
        typer.echo(artifact_sha256(path))
    except Exception as exc:
        say(str(exc))
        raise typer.Exit(2) from None


@models_cli.command("export-onnx")
def models_export_onnx(
    path: Path = typer.Argument(
        ..., help="A transformers classifier folder (config, weights, tokenizer)."
    ),
    opset: int = typer.Option(17, help="The ONNX opset."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead."),
) -> None:
    """Export a transformers classifier folder to PATH/model.onnx for backend "onnx" (or
    "auto"), checked against torch; a version of the repository whose path is PATH gets the
    folder's new sha256 in its model file. Exit 1 when the export fails."""
    from shared.errors import ManifestError
    from shared.families.transformers_onnx import export_onnx
    from shared.repository import update_sha256

    if not (path / "config.json").is_file():
        say(f"{path} is not a transformers model folder (no config.json)")
        raise typer.Exit(2)
    try:
        done = export_onnx(path, opset=opset)
    except Exception as exc:
        say(f"export of {path} failed: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    try:
        updated = update_sha256(Path(get_settings().model_repository), path)
    except ManifestError:  # no repository here: nothing lists the folder
        updated = []
    if as_json:
        print_json(
            {
                "path": str(done.path),
                "inputs": list(done.inputs),
                "opset": done.opset,
                "max_abs_diff": done.max_abs_diff,
                "updated": updated,
            }
        )
        return
    typer.echo(
        f"wrote {done.path} (opset {done.opset}, inputs {', '.join(done.inputs)}; "
        f"largest logit difference from torch {done.max_abs_diff:.1e})"
    )
    for key in updated:
        typer.echo(f"updated the sha256 of {key} in its model file")


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@models_cli.command("add")
def models_add(
    name: str = typer.Argument(..., help="The model's name (its folder in the repository)."),
    version: str = typer.Option(..., "--version", help="The version to add."),
    artifact: Path = typer.Option(
        None, "--artifact", help="Its artifact (file or folder); copied into the model's folder."
    ),
    family: str = typer.Option(None, help="A registered family (new model)."),
    implementation: str = typer.Option(None, help="package.module:Class (new model)."),
    required: bool = typer.Option(
        None, "--required/--optional", help="(new model; default required)"
    ),
    lazy: bool = typer.Option(None, "--lazy/--eager", help="(new model; default eager)"),
    fallback: str = typer.Option(None, help="A model that answers when this one cannot."),
    queue: str = typer.Option(None, help="Route this model's tasks to this queue."),
    option: list[str] = typer.Option(
        None, "--option", help="KEY=VALUE (JSON or text), repeatable."
    ),
    default: bool = typer.Option(False, "--default", help="Make this version the one that loads."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead."),
) -> None:
    """Add a model, or a version of one, to the repository: copy the artifact into the model's
    folder and write its model file with the artifact's sha256."""
    import shutil

    from shared.errors import ManifestError
    from shared.manifest import artifact_sha256
    from shared.repository import (
        MODEL_FILE,
        ModelFile,
        VersionEntry,
        read_model_file,
        write_model_file,
    )

    root = Path(get_settings().model_repository)
    folder = root / name
    try:
        model = read_model_file(folder) if (folder / MODEL_FILE).exists() else None
    except ManifestError as exc:
        say(f"{folder / MODEL_FILE}: {exc}")
        raise typer.Exit(2) from None
    if model is None:
        if not (family or implementation):
            say(f"{name} is a new model: give --family or --implementation")
            raise typer.Exit(2)
        model = ModelFile(family=family or "", implementation=implementation or "")
    elif version in {v.version for v in model.versions}:
        say(f"{name} already has version {version}: choose another version")
        raise typer.Exit(2)
    changes: dict[str, Any] = {
        "family": family,
        "implementation": implementation,
        "required": required,
        "lazy": lazy,
        "fallback": fallback,
        "queue": queue,
    }
    model = model.model_copy(update={k: v for k, v in changes.items() if v is not None})
    options = {}
    for item in option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            say(f"--option {item!r}: expected KEY=VALUE")
            raise typer.Exit(2)
        options[key] = _option_value(value)
    entry = VersionEntry(version=version, options=options)
    if artifact is not None:
        if not artifact.exists():
            say(f"artifact {artifact} does not exist")
            raise typer.Exit(2)
        folder.mkdir(parents=True, exist_ok=True)
        inside = artifact.resolve()
        if folder.resolve() in inside.parents:
            relative = inside.relative_to(folder.resolve()).as_posix()
        else:
            relative = version + ("" if artifact.is_dir() else artifact.suffix)
            target = folder / relative
            if target.exists():
                say(f"{target} exists already: remove it or choose another version")
                raise typer.Exit(2)
            if artifact.is_dir():
                shutil.copytree(artifact, target)
            else:
                shutil.copy2(artifact, target)
        entry = entry.model_copy(
            update={"path": relative, "sha256": artifact_sha256(folder / relative)}
        )
    versions = [*model.versions, entry]
    model = model.model_copy(
        update={
            "versions": versions,
            "default_version": version
            if default
            else (model.default_version or versions[0].version),
        }
    )
    path = write_model_file(folder, model)
    if as_json:
        print_json({"model_file": str(path), "version": entry.model_dump()})
    else:
        typer.echo(
            f"wrote {path}: {name}@{version}" + (f" sha256 {entry.sha256}" if entry.sha256 else "")
        )


def main() -> None:
    from pydantic import ValidationError

    try:
        cli()
    except ValidationError as exc:  # the settings: one line per problem, not a traceback
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())) or "settings"
            say(f"invalid settings ({where}): {error['msg']}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
