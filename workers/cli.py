"""The ``modelworkers`` command: run workers (``up``), try them (``demo``), watch them (``status``,
``health``), reload their models (``reload``)."""

from __future__ import annotations

import json
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
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from shared.settings import get_settings
from shared.state import fleet_summary, read_snapshots
from shared.urls import redact, redis_client, redis_connection_url
from workers.embedded import EmbeddedRedis

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err = Console(stderr=True)


# ---- starting and stopping what we run ------------------------------------------------------
@contextmanager
def redis_for_run() -> Iterator[str]:
    """REDIS_URL when set; else an embedded Redis for as long as the command runs."""
    settings = get_settings()
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedRedis() as server:
        err.print(
            f"[dim]REDIS_URL is not set: started an embedded Redis at {server.url} "
            f"(pid {server.proc.pid if server.proc else '?'})[/]"
        )
        os.environ["REDIS_URL"] = server.url
        get_settings.cache_clear()
        try:
            yield server.url
        finally:
            os.environ.pop("REDIS_URL", None)
            get_settings.cache_clear()


def worker_command(
    concurrency: int,
    pool: str,
    loglevel: str,
    node: str,
    queue: str | None = None,
    events: bool = False,
) -> list[str]:
    """The `celery worker` command line that `up`, `demo` (and the tests) run. ``events``:
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
        err.print(f"[yellow]{name} (pid {proc.pid}) did not stop in {timeout:g} s: killing it[/]")
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    # Own process group: Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen(cmd, start_new_session=True, **kwargs)


def flower_command(port: int, basic_auth: str) -> list[str]:
    """Flower on loopback with basic auth (its HTTP API then needs the same credentials)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.app",
        "flower",
        f"--port={port}",
        "--address=127.0.0.1",
        f"--basic-auth={basic_auth}",
    ]


def wait_ready(
    processes: int, timeout: float, *, watch: subprocess.Popen[Any] | None = None
) -> dict[str, Any]:
    """Poll the registry in Redis until ``processes`` pool processes report ready."""
    settings = get_settings()
    client = redis_client(settings)
    deadline = time.monotonic() + timeout
    summary: dict[str, Any] = {}
    with console.status("waiting for every pool process to load its models...") as status:
        while time.monotonic() < deadline:
            if watch is not None and watch.poll() is not None:
                raise RuntimeError(f"the worker exited with code {watch.returncode}")
            with suppress(Exception):
                summary = fleet_summary(read_snapshots(client, settings.key_prefix))
                status.update(f"{summary['ready_processes']}/{processes} pool processes ready")
                if summary["ready_processes"] >= processes:
                    return summary
            time.sleep(0.2)
    raise TimeoutError(f"pool processes not ready after {timeout:g} s: {summary.get('not_ready')}")


# ---- commands -------------------------------------------------------------------------------
@cli.command()
def up(
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Pool processes."),
    pool: str = typer.Option(None, help="prefork | solo | threads"),
    flower: bool = typer.Option(False, "--flower", help="Also start Flower (basic auth on)."),
    loglevel: str = typer.Option("INFO", help="Worker log level."),
    node: str = typer.Option("modelworkers@%h", "--node", "-n", help="Celery node name."),
) -> None:
    """Start Redis (embedded unless REDIS_URL is set) and a worker, in the foreground."""
    settings = get_settings()
    concurrency = concurrency or settings.worker_concurrency
    pool = pool or settings.worker_pool
    with redis_for_run() as url:
        console.print(f"broker and registry: {redact(url)}")
        procs: list[tuple[str, subprocess.Popen[Any]]] = []
        worker = spawn(worker_command(concurrency, pool, loglevel, node, events=flower))
        procs.append(("worker", worker))
        if flower:
            auth = (
                settings.flower_basic_auth.get_secret_value()
                if settings.flower_basic_auth
                else f"admin:{secrets.token_urlsafe(12)}"
            )
            procs.append(("flower", spawn(flower_command(settings.flower_port, auth))))
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
                        err.print(f"[red]{name} exited with code {proc.returncode}[/]")
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
    os.environ["KEY_PREFIX"] = os.environ["TASK_QUEUE"] = demo_id
    get_settings.cache_clear()
    with redis_for_run() as url:
        from workers.app import app

        app.conf.broker_url = app.conf.result_backend = redis_connection_url(get_settings())
        app.conf.task_default_queue = demo_id
        client = redis_client(get_settings())
        console.print(f"broker and registry: {redact(url)} (demo queue and prefix {demo_id})")
        log_path = Path(tempfile.gettempdir()) / "modelworkers-demo-worker.log"
        log_file = log_path.open("wb")
        worker = spawn(
            worker_command(concurrency, "prefork", "INFO", "demo@%h"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        console.print(f"worker log: {log_path}")
        try:
            t0 = time.perf_counter()
            wait_ready(concurrency, timeout, watch=worker)
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
                    name, _short(result), f"{first_ms:.1f}", f"{statistics.median(warm):.1f}"
                )
            console.print(table)
            bad = app.send_task("sentiment.analyze", args=[""])
            with suppress(Exception):
                bad.get(timeout=30, propagate=False)
            console.print(f"bad input -> {bad.state}: {bad.result!r}")
            print_status(read_snapshots(client, get_settings().key_prefix))
        finally:
            stop_process(worker, "worker")
            log_file.close()
            with suppress(Exception):  # leave nothing of the demo behind in a shared Redis
                client.delete(demo_id, *client.scan_iter(match=f"{demo_id}:*"))
            app.close()


def print_status(snaps: list[dict[str, Any]]) -> None:
    """One row per (process, model); errors are listed in full under the table."""
    summary = fleet_summary(snaps)
    state = "READY" if summary["ready"] else "NOT READY"
    table = Table(title=f"model registry: {summary['processes']} pool processes, {state}")
    for col in ("node", "pid", "model", "version", "status", "load s", "calls", "p95 ms"):
        table.add_column(col, no_wrap=col in ("model", "node"))
    problems = []
    for snap in snaps:
        node = snap.get("node", snap["host"])
        for name, m in snap["models"].items():
            p95 = m.get("latency_p95_ms")
            load = m.get("load_seconds")
            status = m["status"] + ("*" if m.get("reload_error") else "")
            table.add_row(
                node,
                str(snap["pid"]),
                name,
                m["version"],
                status,
                f"{load:.2f}" if load is not None else "-",
                str(m["calls"]),
                f"{p95:.1f}" if p95 is not None else "-",
            )
            for kind in ("error", "reload_error"):
                if m.get(kind):
                    problems.append(f"{node} pid {snap['pid']} {name} {kind}: {m[kind]}")
    console.print(table)
    for line in problems:
        console.print(f"[red]{line}[/]", soft_wrap=True)
    if any(m.get("reload_error") for s in snaps for m in s["models"].values()):
        console.print("* serving the previous version after a failed reload")


def read_fleet() -> list[dict[str, Any]]:
    """Every live process's snapshot; exit 2 with a clear line when Redis cannot be read."""
    settings = get_settings()
    try:
        return read_snapshots(redis_client(settings), settings.key_prefix)
    except Exception as exc:
        err.print(f"cannot read the registry from Redis: {redact(str(exc))}")
        raise typer.Exit(2) from None


@cli.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON instead.")) -> None:
    """Every pool process and its models, from the registry in Redis."""
    snaps = read_fleet()
    if as_json:
        console.print_json(json.dumps({"summary": fleet_summary(snaps), "processes": snaps}))
        return
    if not snaps:
        console.print("no live pool processes (none has published within STATE_TTL_SECONDS)")
        return
    print_status(snaps)


@cli.command()
def health(
    min_processes: int = typer.Option(1, help="Required models must be READY in this many."),
    node: str = typer.Option(None, help="Only this node's processes (a container check)."),
) -> None:
    """Exit 0 when the fleet is ready, 1 when not, 2 when Redis cannot be read."""
    snaps = read_fleet()
    if node:
        snaps = [s for s in snaps if s.get("node") == node or s.get("host") == node]
    summary = fleet_summary(snaps, min_processes=min_processes)
    console.print(
        json.dumps({k: summary[k] for k in ("ready", "processes", "ready_processes", "not_ready")})
    )
    raise typer.Exit(0 if summary["ready"] else 1)


@cli.command()
def reload(
    model: str = typer.Argument(None, help="Model name from the manifest (default: all)."),
    version: str = typer.Option(None, "--version", "-v", help="A version listed in the manifest."),
    destination: list[str] = typer.Option(None, "--destination", "-d", help="Node name(s)."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for every process's result."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for the replies."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Reload models in every pool process (load beside, swap, free); exit 1 if any failed."""
    from shared.errors import ModelWorkersError
    from shared.manifest import manifest_from_settings
    from shared.reload import collect_replies, send_reload

    settings = get_settings()
    client = redis_client(settings)
    try:
        request = send_reload(
            client,
            settings.key_prefix,
            manifest_from_settings(settings),
            models=[model] if model else None,
            version=version,
            nodes=destination or None,
        )
    except ModelWorkersError as exc:
        err.print(f"[red]refused: {exc}[/]")
        raise typer.Exit(2) from None
    except Exception as exc:
        err.print(f"[red]cannot reach Redis: {redact(str(exc))}[/]")
        raise typer.Exit(2) from None
    expected = len(request["expected"])
    if not wait:
        console.print(f"reload {request['id']} sent to {expected} processes")
        return
    with console.status("reloading...") as status:
        outcome = collect_replies(
            client,
            settings.key_prefix,
            request,
            timeout=timeout,
            progress=lambda done, total: status.update(f"{done}/{total} processes reloaded"),
        )
    if as_json:
        console.print_json(json.dumps(outcome))
    else:
        table = Table(title=f"reload {request['id'][:8]}: {', '.join(request['models'])}")
        for col in ("node", "pid", "model", "old", "new", "seconds", "result"):
            table.add_column(col, overflow="fold")
        for reply in outcome["replies"]:
            for r in reply["results"]:
                table.add_row(
                    reply["node"],
                    str(reply["pid"]),
                    str(r["model"]),
                    str(r["old_version"]),
                    str(r["new_version"]),
                    f"{r['seconds']:.2f}" if r.get("seconds") else "-",
                    "ok" if r["ok"] else f"[red]{r['error']}[/]",
                )
        for miss in outcome["missing"]:
            table.add_row(
                str(miss["node"]), str(miss["pid"]), "-", "-", "-", "-", f"[red]{miss['error']}[/]"
            )
        console.print(table)
    if not expected:
        err.print("[yellow]no live pool process matched: nothing was reloaded[/]")
    raise typer.Exit(0 if outcome["ok"] else 1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
