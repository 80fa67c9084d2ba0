"""One serving process and everything it owns, as one object.

:class:`ServingProcess` holds the node name, how many processes share the node's cores, the
registry (and through it the micro-batchers), the heartbeat and the control listener. The worker's
main process creates it in ``worker_init`` (``workers.signals``); its threads start and stop with
it. Which process serves depends on the pool:

* prefork: the parent reads the manifest, imports the ML libraries (``PREIMPORT``) and, in
  ``PRELOAD_MODE=parent``, loads the models too (shared copy-on-write after ``gc.freeze()``);
  each child inherits the object through fork and serves: it loads (or adopts and warms) its
  models in ``worker_process_init``, with a thread pool created in the child.
* solo: ``worker_process_init`` fires in the main process, which serves.
* threads: ``worker_process_init`` never fires; the main process serves from ``worker_init``,
  its threads share one registry, and concurrent requests are micro-batched.

With TRACING, each serving process also starts its own tracing (``workers.tracing``) once it has
rehearsed, and exports what is left of it when it stops.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from shared import cpu, metrics
from shared.batching import BatchPolicy
from shared.families import family_class
from shared.heap import give_back_memory
from shared.manifest import Manifest, ModelSpec, manifest_from_settings
from shared.records import Desired
from shared.registry import ModelRegistry, get_registry, set_registry
from shared.reload import converge, read_desired
from shared.settings import Settings
from shared.urls import redact, redis_client
from workers.heartbeat import ControlListener, Heartbeat, log_reload
from workers.logs import configure_logging, log_model_event, summary_table
from workers.rehearsal import rehearse
from workers.tracing import ProcessTracing, TracingConfig
from workers.tracing import start as start_tracing

log = logging.getLogger("modelworkers.worker")
POOLS = ("prefork", "solo", "threads")
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


class ServingProcess:
    """A worker node's serving side: created once per node, inherited by its pool processes."""

    def __init__(
        self,
        settings: Settings,
        *,
        node: str,
        pool: str,
        concurrency: int,
        queues: set[str] | None = None,
        tracing: TracingConfig | None = None,
    ) -> None:
        """``queues``: the queues this node consumes; it serves the models routed to them
        (a model file's ``queue``, "" meaning TASK_QUEUE). None: every model. ``tracing``:
        TRACING as the main process resolved it (``workers.tracing.configure``); None: off."""
        if pool not in POOLS:
            raise RuntimeError(
                f"modelworkers serves from the prefork, solo or threads pool, not {pool!r}"
            )
        self.settings = settings
        self.node = node
        self.pool = pool
        self.queues = queues
        # processes that share this node's cores (their torch threads split them)
        self.processes = concurrency if pool == "prefork" else 1
        # PRELOAD_MODE=parent in effect: decided in prepare(), once torch is imported
        self.copy_on_write = False
        self.manifest: Manifest | None = None
        self.registry: ModelRegistry | None = None
        self.heartbeat: Heartbeat | None = None
        self.listener: ControlListener | None = None
        self.tracing_config = tracing
        self.tracing: ProcessTracing | None = None  # this serving process's, once it serves
        # (model, version) that failed at start and were replaced by the active version: never
        # tried again by this process or (copy-on-write) by the children that inherit this
        self.fell_back: set[tuple[str, str]] = set()
        self._serving_pid: int | None = None
        # BLAS / OpenMP thread limit the copy-on-write parent set before fork (children inherit)
        self._limited_before_fork: int | None = None

    # ---- the worker's main process, before the pool starts ---------------------------------
    def prepare(self) -> None:
        """``worker_init``: metrics, manifest, imports; load now where this process serves
        (threads pool) or shares its models (copy-on-write parent)."""
        self.settings.ensure_dirs()
        if self.pool in ("prefork", "solo"):
            one_malloc_arena()
        self.enable_metrics()
        self.manifest = self.read_manifest(log_problems=True)
        if self.settings.preimport:
            seconds = self.preimport()
            log.info(
                "imported model libraries in %.2f s before starting the %s pool", seconds, self.pool
            )
        self.copy_on_write = (
            self.pool == "prefork" and resolve_preload_mode(self.settings) == "parent"
        )
        if self.pool == "threads":
            self.start()
        elif self.copy_on_write:
            self.load_in_parent()

    def enable_metrics(self) -> None:
        """METRICS_PORT set: metrics on, in a directory this node's processes share
        (PROMETHEUS_MULTIPROC_DIR, else a new one under the temp directory)."""
        if not self.settings.metrics_port:
            return
        folder = self.settings.prometheus_multiproc_dir or (
            Path(tempfile.gettempdir()) / f"modelworkers-metrics-{os.getpid()}"
        )
        metrics.enable(folder)

    def read_manifest(self, *, log_problems: bool = False) -> Manifest:
        """The manifest as this worker reads it (also re-read for every reload)."""
        manifest = manifest_from_settings(self.settings)
        if log_problems:
            for name, problem in manifest.problems.items():
                log.error("manifest entry %s skipped: %s", name, problem)
            for path in manifest.unlisted:
                log.warning(
                    "artifact %s is not listed in the manifest: it will not be loaded", path
                )
        return manifest

    def preimport(self) -> float:
        """Import every family's libraries (no compute); returns seconds spent."""
        assert self.manifest is not None
        t0 = time.perf_counter()
        for family, implementation in sorted(
            {(s.family, s.implementation) for s in self.manifest.specs if self.serves(s)}
        ):
            try:
                family_class(family, implementation).preimport()
            except Exception as exc:  # the family's load fails with the same reason, per model
                log.warning("family %s cannot be imported: %s", implementation or family, exc)
        return time.perf_counter() - t0

    def load_in_parent(self) -> None:
        """PRELOAD_MODE=parent: load on CPU, no compute, then freeze the heap for copy-on-write."""
        assert self.manifest is not None
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)  # no intra-op thread pool here: fork-safe
        registry = self.new_registry(device="cpu", warmup=False)
        self.load_models(registry)
        metrics.mark_process_dead(os.getpid())  # the children report these models, not the parent
        t0 = time.perf_counter()
        warmed = registry.warm_all(before_fork=True) if self.settings.warm_before_fork else []
        registry.before_fork()  # ONNX Runtime sessions: each pool process opens its own
        # the pool processes' BLAS / OpenMP limit, set once here: inherited through fork, it
        # spares each of them threadpoolctl's look at every loaded library (private memory)
        self._limited_before_fork = limit_library_threads(
            self.settings.resolved_torch_threads(self.processes)
        )
        gc.collect()
        gc.freeze()  # keep object headers of the shared models from being copied on refcount writes
        log.info(
            "models loaded in the parent (copy-on-write mode)\n%s",
            summary_table(registry.snapshot()),
        )
        if warmed:
            log.info(
                "warmed before fork, shared by every pool process: %s (%.2f s)",
                ", ".join(warmed),
                time.perf_counter() - t0,
            )

    # ---- a serving process ---------------------------------------------------------------
    def start(self) -> ModelRegistry:
        """Load (or adopt and warm) this process's models, log the table, rehearse, start the
        heartbeat and the control listener. Once per process."""
        if self._serving_pid == os.getpid():
            return get_registry()
        self._serving_pid = os.getpid()
        configure_logging()
        self.settings.ensure_dirs()
        threads = self.set_threads()
        if self.pool == "prefork" and self.settings.borrow_idle_cores:
            cpu.enable(threads)  # a large batch may run on the idle pool processes' cores too
        if self.copy_on_write:
            registry = self.adopt_inherited(threads)
        else:
            registry = self.new_registry(device=self.settings.model_device, warmup=True)
            t0 = time.perf_counter()
            self.load_models(registry)
            log.info(
                "pid %d loaded %d models in %.2f s (torch threads %d)",
                os.getpid(),
                len(registry.names()),
                time.perf_counter() - t0,
                threads,
            )
        log.info("%s", summary_table(registry.snapshot()))
        warm_result_backend()
        if self.settings.rehearse_tasks:
            rehearse(registry, fits=self.settings.rehearse_fit_tasks)
        give_back_memory()  # what the warm-up and the rehearsal freed, back to the system
        if self.tracing_config is not None:  # after the rehearsal: no spans for its runs
            self.tracing = start_tracing(self.tracing_config)
        self.heartbeat = Heartbeat(
            self.settings, registry, self.read_manifest, self.fell_back, serves=self.serves
        )
        self.heartbeat.start()
        self.listener = ControlListener(
            self.settings, registry, self.heartbeat, self.read_manifest, serves=self.serves
        )
        self.listener.start()

        return registry

    def adopt_inherited(self, threads: int) -> ModelRegistry:
        """A copy-on-write child: take over the parent's registry, warm what the parent could
        not (torch), and catch up with a reload the parent missed."""
        registry = get_registry()
        registry.after_fork()
        registry.started_at = time.time()
        registry.threads = threads
        registry.warm_all()
        registry.warmup = True  # reloads in this child warm their new models up
        for name in registry.names():  # this process now serves them: its own metrics series
            metrics.record_state(registry.metadata(name))
        try:
            desired = read_desired(redis_client(self.settings), self.settings.key_prefix, self.node)
            for result in converge(
                registry, self.read_manifest, desired, set(self.fell_back), serves=self.serves
            ):
                log_reload(result)
        except Exception as exc:
            log.warning(
                "cannot check desired versions (%s); heartbeat will retry", redact(str(exc))
            )
        return registry

    def stop(self) -> None:
        """Process shutdown: stop the threads, export the spans still queued, remove the
        snapshot key, unload every model."""
        if self.listener is not None:
            self.listener.stopping.set()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self.tracing is not None and self.tracing.pid == os.getpid():
            traced, self.tracing = self.tracing, None  # once: worker_shutdown may follow
            traced.stop()
        if self._serving_pid == os.getpid():
            get_registry().close()
        metrics.mark_process_dead(os.getpid())

    # ---- helpers -------------------------------------------------------------------------
    def new_registry(self, *, device: str, warmup: bool) -> ModelRegistry:
        """This process's registry, configured from the settings, installed as the process's."""
        settings = self.settings
        threads = settings.resolved_torch_threads(self.processes)
        assert self.manifest is not None
        registry = ModelRegistry(
            device=device,
            threads=threads,
            load_timeout=settings.load_timeout_seconds,
            # every load must end (READY or FAILED) before Celery gives up on the child
            start_deadline=max(1.0, settings.proc_alive_timeout_seconds - 10),
            loader_threads=settings.loader_threads,
            warmup=warmup,
            inference_timeout=settings.inference_timeout_seconds,
            memory_budget_mb=settings.model_memory_budget_mb,
            lazy_retry_seconds=settings.lazy_retry_seconds,
            option_defaults={
                "pad_ratio": settings.batch_pad_ratio,
                "small_forward_mflop": settings.torch_small_forward_mflop,
                "backend": settings.transformers_backend,
            },
            batching=BatchPolicy(
                max_size=settings.batch_max_size,
                window=settings.batch_window_ms / 1000,
                lanes=settings.batch_lanes,
                threads=threads,
            ),
            node=self.node,
            listeners=[log_model_event, metrics.record_state],
            call_observers=[metrics.record_call],
            event_observers=[metrics.record_event],
            unlisted=self.manifest.unlisted,
            manifest_problems=self.manifest.problems,
        )
        self.registry = registry
        return set_registry(registry)

    def serves(self, spec: ModelSpec) -> bool:
        """Whether this node serves ``spec``: its queue is one this node consumes."""
        return self.queues is None or (spec.queue or self.settings.task_queue) in self.queues

    def read_desired(self) -> dict[str, Desired]:
        """What the fleet (or this node) should serve, from Redis; {} when Redis cannot say."""
        try:
            return read_desired(redis_client(self.settings), self.settings.key_prefix, self.node)
        except Exception as exc:  # Redis down at start: serve the repository's defaults
            log.warning(
                "cannot read desired versions from Redis (%s); using the repository's defaults",
                redact(str(exc)),
            )
            return {}

    def specs_to_load(self, desired: dict[str, Desired]) -> list[ModelSpec]:
        """The version to serve of each model routed to this node's queues: the one the fleet
        asked for (the largest share of a split), else the model file's default."""
        assert self.manifest is not None
        manifest = self.manifest
        out = []
        for spec in (s for s in manifest.active() if self.serves(s)):
            want = desired.get(spec.name)
            if want is not None and want.weights:
                version = max(want.weights, key=lambda v: want.weights[v])
                if version != spec.version:
                    try:
                        spec = manifest.get(spec.name, version)
                    except Exception:
                        log.warning(
                            "desired version %s of %s is not in the repository", version, spec.name
                        )
            out.append(spec)
        return out

    def load_models(self, registry: ModelRegistry) -> None:
        """Load this process's models as the fleet wants them: the serving version of each,
        then splits (the other versions) and purposely unloaded models (registered only)."""
        desired = self.read_desired()
        assert self.manifest is not None
        for name in self.manifest.names:  # a model file's split, unless the fleet says otherwise
            split = self.manifest.split(name)
            if split and name not in desired:
                desired[name] = Desired(weights=split)
        specs = self.specs_to_load(desired)

        unloaded = {name for name, want in desired.items() if want.unloaded}
        registry.load_all([s for s in specs if s.name not in unloaded])
        for spec in specs:
            if spec.name in unloaded:
                registry.register(spec)
                registry.unload(spec.name, 0.0)
        self.fall_back_to_active(registry, specs)
        for result in converge(
            registry, self.read_manifest, desired, set(self.fell_back), serves=self.serves
        ):
            log_reload(result)

    def fall_back_to_active(self, registry: ModelRegistry, specs: list[ModelSpec]) -> None:
        """A reloaded (desired) version that fails to load in a new process: serve the
        manifest's active version instead of nothing, and say so."""
        assert self.manifest is not None
        active = {s.name: s for s in self.manifest.active()}
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
            self.fell_back.add((spec.name, spec.version))
            registry.reload(default)

    def set_threads(self) -> int:
        """Split the cores among the serving processes: torch's intra-op threads, and the BLAS
        / OpenMP pools of numpy, scipy and scikit-learn (already loaded in the parent, where
        setting OMP_NUM_THREADS would change nothing: threadpoolctl resizes them). A
        copy-on-write child inherits the limit its parent set before fork."""
        threads = self.settings.resolved_torch_threads(self.processes)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        if self._limited_before_fork != threads:
            limit_library_threads(threads)
        return threads


def limit_library_threads(threads: int) -> int | None:
    """The thread pools of the loaded BLAS and OpenMP libraries limited to ``threads``
    (threadpoolctl); returns ``threads``, or None without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    threadpool_limits(threads)
    return threads


def one_malloc_arena() -> None:
    """glibc gives each thread that allocates its own malloc arena, and memory freed in a
    loader thread's arena is not all handed back: an unloaded model's memory would partly stay.
    Serving processes of the prefork and solo pools serve from one thread, so they lose nothing
    by sharing one arena (set here, before any loader thread starts; forked children inherit
    it). The threads pool keeps one arena per thread: its lanes allocate side by side."""
    with suppress(OSError, AttributeError):  # not glibc: nothing to set
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)


def resolve_preload_mode(settings: Settings) -> str:
    """PRELOAD_MODE, with auto decided in the parent: copy-on-write unless CUDA is in play.

    ``torch.cuda.device_count()`` is safe before fork (it does not initialise CUDA), unlike
    ``torch.cuda.is_available()``; see docs/architecture.md.
    """
    mode = settings.preload_mode
    if mode != "auto":
        return mode
    if settings.model_device == "cuda":
        return "child"
    torch = sys.modules.get("torch")
    if settings.model_device == "auto" and torch is not None and torch.cuda.device_count() > 0:
        return "child"

    return "parent"


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


_current: ServingProcess | None = None


def install(serving: ServingProcess) -> ServingProcess:
    """Make ``serving`` this node's serving process (the worker's ``worker_init``)."""
    global _current
    _current = serving
    return serving


def current() -> ServingProcess | None:
    """This node's serving process, once ``worker_init`` has created it."""
    return _current
