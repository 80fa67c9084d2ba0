"""One serving process's life: manifest, preimports, model loading, heartbeat, shutdown.

Called from the thin handlers in ``workers.signals``. Which process loads depends on the pool:

* prefork: the parent imports the ML libraries (``PREIMPORT``) and, in ``PRELOAD_MODE=parent``,
  loads the models too (shared copy-on-write after ``gc.freeze()``); each child then loads (or
  just warms) its models in ``worker_process_init``, with a thread pool created in the child.
* solo: ``worker_process_init`` fires in the main process, which loads.
* threads: ``worker_process_init`` never fires; the main process loads in ``worker_init`` and its
  threads share one registry.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shared import metrics
from shared.families import family_class
from shared.manifest import Manifest, ModelSpec, manifest_from_settings
from shared.registry import ModelRegistry, get_registry, set_registry
from shared.reload import (
    channel,
    converge,
    handle_request,
    read_desired,
    reply_key,
    restore_desired,
)
from shared.settings import Settings
from shared.state import proc_key, publish_snapshot
from shared.urls import redact, redis_client
from workers.logs import configure_logging, log_model_event, summary_table
from workers.rehearsal import rehearse

log = logging.getLogger("modelworkers.worker")

# Set in the worker's main process before the pool forks; inherited by every child.
NODE_NAME: str = ""
SERVING_PROCESSES: int | None = None  # processes that share this node's cores (torch threads)
_manifest: Manifest | None = None
_heartbeat: Heartbeat | None = None
# (model, version) pairs that failed at start and were replaced by the active version: the
# heartbeat must not try them again (inherited by children in parent mode).
_fell_back: set[tuple[str, str]] = set()
_loaded_in_pid: int | None = None


def enable_metrics(settings: Settings) -> None:
    """METRICS_PORT set: metrics on, in a directory this node's processes share (the setting,
    an inherited PROMETHEUS_MULTIPROC_DIR, or a new one under the temp directory)."""
    if not settings.metrics_port:
        return
    folder = settings.prometheus_multiproc_dir or Path(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        or Path(tempfile.gettempdir()) / f"modelworkers-metrics-{os.getpid()}"
    )
    metrics.enable(folder)


def read_manifest(settings: Settings) -> Manifest:
    """Parse the manifest once per process, logging entries it had to skip."""
    global _manifest
    manifest = manifest_from_settings(settings)
    for name, problem in manifest.problems.items():
        log.error("manifest entry %s skipped: %s", name, problem)
    for path in manifest.unlisted:
        log.warning("artifact %s is not listed in the manifest: it will not be loaded", path)
    _manifest = manifest
    return manifest


def current_manifest(settings: Settings) -> Manifest:
    return _manifest if _manifest is not None else read_manifest(settings)


def preimport(manifest: Manifest) -> float:
    """Import every family's libraries (no compute); returns seconds spent."""
    t0 = time.perf_counter()
    for family, implementation in sorted({(s.family, s.implementation) for s in manifest.specs}):
        try:
            family_class(family, implementation).preimport()
        except Exception as exc:  # the family's load fails with the same reason, per model
            log.warning("family %s cannot be imported: %s", implementation or family, exc)
    return time.perf_counter() - t0


def specs_to_load(manifest: Manifest, settings: Settings) -> list[ModelSpec]:
    """The active spec of each model, or the version a fleet-wide reload asked for."""
    specs = manifest.active()
    try:
        desired = read_desired(redis_client(settings), settings.key_prefix, NODE_NAME or None)
    except Exception as exc:  # Redis down at start: serve the manifest's active versions
        log.warning(
            "cannot read desired versions from Redis (%s); using manifest defaults",
            redact(str(exc)),
        )
        return specs
    out = []
    for spec in specs:
        version = desired.get(spec.name)
        if version and version != spec.version:
            try:
                spec = manifest.get(spec.name, version)
            except Exception:
                log.warning("desired version %s of %s is not in the manifest", version, spec.name)
        out.append(spec)
    return out


def fall_back_to_active(
    registry: ModelRegistry, manifest: Manifest, specs: list[ModelSpec]
) -> None:
    """A reloaded (desired) version that fails to load in a new process: serve the manifest's
    active version instead of nothing, and say so."""
    active = {s.name: s for s in manifest.active()}
    for spec in specs:
        default = active.get(spec.name)
        meta = registry.metadata(spec.name)
        if default is None or default.version == spec.version or meta.status != "FAILED":
            continue
        log.warning(
            "desired version %s of %s failed to load (%s); loading the manifest's %s",
            spec.version,
            spec.name,
            meta.error,
            default.version,
        )
        _fell_back.add((spec.name, spec.version))
        registry.reload(default)


def set_torch_threads(settings: Settings) -> int:
    """Split the cores among the serving processes: torch's intra-op threads, and the BLAS /
    OpenMP pools of numpy, scipy and scikit-learn (already loaded in the parent, so setting
    OMP_NUM_THREADS now would change nothing: threadpoolctl resizes them)."""
    threads = settings.resolved_torch_threads(SERVING_PROCESSES)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    return threads


def new_registry(settings: Settings, *, device: str, warmup: bool) -> ModelRegistry:
    registry = ModelRegistry(
        device=device,
        load_timeout=settings.load_timeout_seconds,
        # every load must end (READY or FAILED) before Celery gives up on the child
        start_deadline=max(1.0, settings.proc_alive_timeout_seconds - 10),
        loader_threads=settings.loader_threads,
        warmup=warmup,
        inference_timeout=settings.inference_timeout_seconds,
    )
    registry.add_listener(log_model_event)
    registry.node = NODE_NAME
    return set_registry(registry)


_preload_mode: str | None = None


def resolve_preload_mode(settings: Settings) -> str:
    """PRELOAD_MODE, with auto decided once in the parent: copy-on-write unless CUDA is in play.

    ``torch.cuda.device_count()`` is safe before fork (it does not initialise CUDA), unlike
    ``torch.cuda.is_available()``; see docs/architecture.md.
    """
    global _preload_mode
    if _preload_mode is None:
        mode = settings.preload_mode
        if mode == "auto":
            mode = "parent"
            if settings.model_device == "cuda":
                mode = "child"
            elif settings.model_device == "auto" and "torch" in sys.modules:
                import torch

                if torch.cuda.device_count() > 0:
                    mode = "child"
        _preload_mode = mode
    return _preload_mode


def load_in_parent(settings: Settings) -> None:
    """PRELOAD_MODE=parent: load on CPU, no compute, then freeze the heap for copy-on-write."""
    manifest = current_manifest(settings)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)  # no intra-op thread pool in the parent: fork-safe
    registry = new_registry(settings, device="cpu", warmup=False)
    registry.unlisted, registry.manifest_problems = manifest.unlisted, manifest.problems
    specs = specs_to_load(manifest, settings)
    registry.load_all(specs)
    fall_back_to_active(registry, manifest, specs)
    metrics.mark_process_dead(os.getpid())  # the children report these models, not the parent
    t0 = time.perf_counter()
    warmed = registry.warm_all(before_fork=True) if settings.warm_before_fork else []
    gc.collect()
    gc.freeze()  # keep object headers of the shared models from being copied on refcount writes
    log.info(
        "models loaded in the parent (copy-on-write mode)\n%s", summary_table(registry.snapshot())
    )
    if warmed:
        log.info(
            "warmed before fork, shared by every pool process: %s (%.2f s)",
            ", ".join(warmed),
            time.perf_counter() - t0,
        )


def start_serving(settings: Settings, *, inherited: bool = False) -> ModelRegistry:
    """Load (or adopt and warm) this process's models, log the table, start the heartbeat."""
    global _loaded_in_pid
    if _loaded_in_pid == os.getpid():
        return get_registry()
    _loaded_in_pid = os.getpid()
    configure_logging()
    settings.ensure_dirs()
    threads = set_torch_threads(settings)
    manifest = current_manifest(settings)
    if inherited:
        registry = get_registry()
        registry.after_fork()
        registry.started_at = time.time()
        registry.warm_all()
        registry.warmup = True  # reloads in this child warm their new models up
        for name in registry.names():  # this process now serves them: its own metrics series
            metrics.record_state(registry.metadata(name))
        # A child forked after a reload inherits the parent's (older) models: catch up with the
        # fleet's desired versions before serving.
        try:
            desired = read_desired(redis_client(settings), settings.key_prefix, NODE_NAME or None)
            for result in converge(
                registry, lambda: manifest_from_settings(settings), desired, set(_fell_back)
            ):
                log_reload(result)
        except Exception as exc:
            log.warning(
                "cannot check desired versions (%s); heartbeat will retry", redact(str(exc))
            )
    else:
        registry = new_registry(settings, device=settings.model_device, warmup=True)
        registry.unlisted, registry.manifest_problems = manifest.unlisted, manifest.problems
        t0 = time.perf_counter()
        specs = specs_to_load(manifest, settings)
        registry.load_all(specs)
        fall_back_to_active(registry, manifest, specs)
        log.info(
            "pid %d loaded %d models in %.2f s (torch threads %d)",
            os.getpid(),
            len(registry.names()),
            time.perf_counter() - t0,
            threads,
        )
    log.info("%s", summary_table(registry.snapshot()))
    warm_result_backend()
    if settings.rehearse_tasks:
        rehearse(registry)
    start_heartbeat(settings, registry)
    return registry


def warm_result_backend() -> None:
    """Open this process's result-backend connection now, so that the first task after READY
    does not pay for the connection (TCP, handshake) when it stores its result."""
    from celery import current_app

    try:
        client = getattr(current_app.backend, "client", None)
        if client is not None:
            client.ping()
    except Exception as exc:  # Redis down: the first result write retries (and logs) anyway
        log.warning("result backend not reachable yet: %s", redact(str(exc)))


def log_reload(result: dict[str, Any]) -> None:
    if result.get("ok"):
        log.info(
            "reloaded %s: %s -> %s in %.2f s [pid %d]",
            result["model"],
            result["old_version"],
            result["new_version"],
            result["seconds"] or 0,
            os.getpid(),
        )
    else:
        log.error(
            "reload of %s to %s failed, %s keeps serving: %s [pid %d]",
            result["model"],
            result["new_version"],
            result["old_version"],
            result["error"],
            os.getpid(),
        )


class Heartbeat(threading.Thread):
    """Every HEARTBEAT_SECONDS: republish this process's snapshot, and converge on the fleet's
    desired model versions (catching up on a reload this process missed). Survives Redis
    restarts: a failed beat is logged once and retried."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        super().__init__(name="registry-heartbeat", daemon=True)
        self.settings, self.registry = settings, registry
        self.client = redis_client(settings)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.reload_lock = threading.Lock()  # shared with the listener: reloads never interleave
        self.attempted: set[tuple[str, str]] = set(_fell_back)
        self._failing = False

    def converge(self) -> None:
        desired = read_desired(self.client, self.settings.key_prefix, self.registry.node)
        if not desired or not self.reload_lock.acquire(blocking=False):
            return  # nothing desired, or a reload is running: never block the heartbeat
        try:
            for result in converge(
                self.registry,
                lambda: manifest_from_settings(self.settings),
                desired,
                self.attempted,
            ):
                log_reload(result)
        finally:
            self.reload_lock.release()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.converge()
                if self.stopping.is_set():
                    break  # shutting down: stop() deletes the key, never publish it again
                publish_snapshot(
                    self.client,
                    self.settings.key_prefix,
                    self.registry.snapshot(),
                    self.settings.state_ttl_seconds,
                )
                if self._failing:
                    log.info("registry heartbeat to Redis resumed")
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("registry heartbeat failed (will retry): %s", redact(str(exc)))
                self._failing = True
            self.wake.wait(self.settings.heartbeat_seconds)
            self.wake.clear()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop beating and remove this process's key. A beat in progress is waited for
        (bounded): a process that shuts down right after it started (memory recycling: one task)
        would otherwise see its first beat publish the key again after the delete."""
        self.stopping.set()
        self.wake.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        try:
            key = proc_key(self.settings.key_prefix, self.registry.snapshot()["host"], os.getpid())
            self.client.delete(key)
        except Exception:
            pass


class ControlListener(threading.Thread):
    """Acts on reload requests from the PREFIX:control channel, one at a time, and replies."""

    def __init__(self, settings: Settings, registry: ModelRegistry, heartbeat: Heartbeat) -> None:
        super().__init__(name="control-listener", daemon=True)
        self.settings, self.registry, self.heartbeat = settings, registry, heartbeat
        self.stopping = threading.Event()
        self.subscribed = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                client = redis_client(self.settings, socket_timeout=None)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel(self.settings.key_prefix))
                self.subscribed.set()
                backoff = 0.5
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self.handle(client, json.loads(message["data"]))
            except Exception as exc:
                self.subscribed.clear()
                if not self.stopping.is_set():
                    log.warning(
                        "control channel lost (%s); resubscribing in %.1f s",
                        redact(str(exc)),
                        backoff,
                    )
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)

    def handle(self, client: Any, request: dict[str, Any]) -> None:
        nodes = request.get("nodes")
        if request.get("action") != "reload" or (nodes and self.registry.node not in nodes):
            return
        with self.heartbeat.reload_lock:
            results = handle_request(
                self.registry, lambda: manifest_from_settings(self.settings), request
            )
        for result in results:
            log_reload(result)
            if request.get("version") and result.get("model"):
                self.heartbeat.attempted.add((result["model"], request["version"]))
        snap = self.registry.snapshot()
        reply = {
            "node": snap["node"],
            "host": snap["host"],
            "pid": snap["pid"],
            "ok": all(r["ok"] for r in results),
            "results": results,
        }
        if not reply["ok"]:
            restore_desired(client, request)
        key = reply_key(self.settings.key_prefix, request["id"])
        client.rpush(key, json.dumps(reply))
        client.expire(key, 3600)
        self.heartbeat.wake.set()  # publish the new state now


_listener: ControlListener | None = None


def start_heartbeat(settings: Settings, registry: ModelRegistry) -> None:
    global _heartbeat, _listener
    # New threads per process: threads inherited through fork do not run in the child.
    _heartbeat = Heartbeat(settings, registry)
    _heartbeat.start()
    _listener = ControlListener(settings, registry, _heartbeat)
    _listener.start()


def stop_serving() -> None:
    """Process shutdown: stop the heartbeat, remove our key, unload every model."""
    if _listener is not None:
        _listener.stopping.set()
    if _heartbeat is not None:
        _heartbeat.stop()
    if _loaded_in_pid == os.getpid():
        get_registry().unload_all()
    metrics.mark_process_dead(os.getpid())
