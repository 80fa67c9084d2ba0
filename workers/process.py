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
import logging
import os
import sys
import threading
import time

from shared.families import family_class
from shared.manifest import Manifest, ModelSpec, load_manifest
from shared.registry import ModelRegistry, get_registry, set_registry
from shared.settings import Settings
from shared.state import proc_key, publish_snapshot
from shared.urls import redact, redis_client
from workers.logs import configure_logging, log_model_event, summary_table

log = logging.getLogger("modelworkers.worker")

# Set in the worker's main process before the pool forks; inherited by every child.
NODE_NAME: str = ""
_manifest: Manifest | None = None
_heartbeat: Heartbeat | None = None
_loaded_in_pid: int | None = None


def desired_key(prefix: str) -> str:
    """Hash name -> version: the version every process should serve (set by reloads)."""
    return f"{prefix}:desired"


def read_manifest(settings: Settings) -> Manifest:
    """Parse the manifest once per process, logging entries it had to skip."""
    global _manifest
    overrides = {"sentiment": settings.sentiment_model} if settings.sentiment_model else None
    manifest = load_manifest(settings.model_manifest, overrides=overrides)
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
    for family in sorted({s.family for s in manifest.specs}):
        try:
            family_class(family).preimport()
        except ImportError as exc:  # the family's load will fail with the same reason, per model
            log.warning("family %s cannot be imported: %s", family, exc)
    return time.perf_counter() - t0


def specs_to_load(manifest: Manifest, settings: Settings) -> list[ModelSpec]:
    """The active spec of each model, or the version a fleet-wide reload asked for."""
    specs = manifest.active()
    try:
        desired = redis_client(settings).hgetall(desired_key(settings.key_prefix))
    except Exception as exc:  # Redis down at start: serve the manifest's active versions
        log.warning(
            "cannot read desired versions from Redis (%s); using manifest defaults",
            redact(str(exc)),
        )
        return specs
    out = []
    for spec in specs:
        version = desired.get(spec.name.encode())
        if version and version.decode() != spec.version:
            try:
                spec = manifest.get(spec.name, version.decode())
            except Exception:
                log.warning("desired version %s of %s is not in the manifest", version, spec.name)
        out.append(spec)
    return out


def set_torch_threads(settings: Settings) -> int:
    threads = settings.resolved_torch_threads()
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def new_registry(settings: Settings, *, device: str, warmup: bool) -> ModelRegistry:
    registry = ModelRegistry(
        device=device,
        load_timeout=settings.load_timeout_seconds,
        loader_threads=settings.loader_threads,
        warmup=warmup,
    )
    registry.add_listener(log_model_event)
    registry.node = NODE_NAME
    return set_registry(registry)


def load_in_parent(settings: Settings) -> None:
    """PRELOAD_MODE=parent: load on CPU, no compute, then freeze the heap for copy-on-write."""
    manifest = current_manifest(settings)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)  # no intra-op thread pool in the parent: fork-safe
    registry = new_registry(settings, device="cpu", warmup=False)
    registry.unlisted, registry.manifest_problems = manifest.unlisted, manifest.problems
    registry.load_all(specs_to_load(manifest, settings))
    gc.collect()
    gc.freeze()  # keep object headers of the shared models from being copied on refcount writes
    log.info(
        "models loaded in the parent (copy-on-write mode)\n%s", summary_table(registry.snapshot())
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
        registry.started_at = time.time()
        registry.warm_all()
    else:
        registry = new_registry(settings, device=settings.model_device, warmup=True)
        registry.unlisted, registry.manifest_problems = manifest.unlisted, manifest.problems
        t0 = time.perf_counter()
        registry.load_all(specs_to_load(manifest, settings))
        log.info(
            "pid %d loaded %d models in %.2f s (torch threads %d)",
            os.getpid(),
            len(registry.names()),
            time.perf_counter() - t0,
            threads,
        )
    log.info("%s", summary_table(registry.snapshot()))
    start_heartbeat(settings, registry)
    return registry


class Heartbeat(threading.Thread):
    """Republishes this process's snapshot every HEARTBEAT_SECONDS; survives Redis restarts."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        super().__init__(name="registry-heartbeat", daemon=True)
        self.settings, self.registry = settings, registry
        self.client = redis_client(settings)
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._failing = False

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
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

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        try:
            key = proc_key(self.settings.key_prefix, self.registry.snapshot()["host"], os.getpid())
            self.client.delete(key)
        except Exception:
            pass


def start_heartbeat(settings: Settings, registry: ModelRegistry) -> None:
    global _heartbeat
    # A new heartbeat per process: one inherited through fork has no thread in the child.
    _heartbeat = Heartbeat(settings, registry)
    _heartbeat.start()


def stop_serving() -> None:
    """Process shutdown: stop the heartbeat, remove our key, unload every model."""
    if _heartbeat is not None:
        _heartbeat.stop()
    if _loaded_in_pid == os.getpid():
        get_registry().unload_all()
