"""Per-process, thread-safe model registry: load, look up, swap, count.

Rules (after Triton and MLServer): a model is registered LOADING before it loads and ends READY
or FAILED(reason). A reload loads the new version beside the old one and swaps atomically; a
failed reload keeps the old version serving and records the error. Lookups raise ModelNotFound or
ModelNotReady naming the model and its state.

The registry is given its configuration (device, thread budget, time limits, option defaults,
micro-batching policy) and its observers (listeners for state changes, e.g. logs and metrics;
call observers for served calls) by whoever builds it; it reads no global settings and does not
import Celery.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from shared.batching import BatchPolicy, MicroBatcher
from shared.errors import InferenceTimeout, LoadTimeout, ModelNotFound, ModelNotReady
from shared.families import Model, ModelContext, family_class
from shared.manifest import ModelSpec
from shared.records import ModelStatus, ProcessSnapshot, ReloadResult

log = logging.getLogger("modelworkers.registry")
LATENCY_WINDOW = 1024

Listener = Callable[["ModelMetadata"], None]
CallObserver = Callable[[str, str, float, bool], None]  # model, version, seconds, ok


class ModelState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


def _rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing or /proc unreadable
        return 0


@dataclass
class ModelMetadata:
    """What the registry knows about one model in this process (mutable, behind its lock)."""

    name: str
    family: str
    version: str
    required: bool
    lazy: bool = False
    fallback: str | None = None
    status: ModelState = ModelState.UNLOADED
    loaded_at: float | None = None
    load_seconds: float | None = None
    error: str | None = None
    device: str = "cpu"
    queue: str = ""
    memory_delta_mb: float | None = None
    reload_error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    calls: int = 0
    failures: int = 0
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    _latency_total: float = 0.0

    def observe(self, seconds: float, ok: bool) -> None:
        self.calls += 1
        if not ok:
            self.failures += 1
        self._latencies.append(seconds)
        self._latency_total += seconds

    def status_record(self) -> ModelStatus:
        lat = sorted(self._latencies)
        p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] * 1000 if lat else None
        return ModelStatus(
            name=self.name,
            family=self.family,
            version=self.version,
            status=str(self.status),
            required=self.required,
            lazy=self.lazy,
            fallback=self.fallback,
            loaded_at=self.loaded_at,
            load_seconds=self.load_seconds,
            error=self.error,
            reload_error=self.reload_error,
            device=self.device,
            queue=self.queue,
            memory_delta_mb=self.memory_delta_mb,
            calls=self.calls,
            failures=self.failures,
            latency_mean_ms=(self._latency_total / self.calls * 1000) if self.calls else None,
            latency_p95_ms=p95,
            details=dict(self.details),
        )


@dataclass
class _Entry:
    spec: ModelSpec
    meta: ModelMetadata
    model: Model | None = None
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    started: float | None = None  # monotonic start of the current load
    abandoned: bool = False  # its load timed out; the loader thread may still be stuck
    generation: int = 0  # bumped by every load, reload and abandon: only the current one writes


class ModelRegistry:
    """Holds this process's models by name. Thread-safe; one per process (see get_registry)."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        threads: int = 1,
        load_timeout: float = 60.0,
        loader_threads: int = 4,
        warmup: bool = True,
        start_deadline: float | None = None,
        inference_timeout: float = 30.0,
        option_defaults: Mapping[str, Any] | None = None,
        batching: BatchPolicy | None = None,
        node: str = "",
        listeners: Sequence[Listener] = (),
        call_observers: Sequence[CallObserver] = (),
        unlisted: Sequence[str] = (),
        manifest_problems: Mapping[str, str] | None = None,
    ) -> None:
        """``device``: where models that run on a device go (MODEL_DEVICE); ``threads``: the
        process's torch/BLAS thread budget; ``option_defaults``: deployment defaults for model
        options a model file does not set; ``batching``: micro-batching for concurrent requests
        in this process (None: none, as in a prefork pool process)."""
        self.device = device
        self.threads = threads
        self.load_timeout = load_timeout
        self.loader_threads = loader_threads
        self.warmup = warmup
        self.start_deadline = start_deadline
        self.inference_timeout = inference_timeout
        self.option_defaults = dict(option_defaults or {})
        self.batching = batching
        self.node = node
        self.unlisted = list(unlisted)
        self.manifest_problems = dict(manifest_problems or {})
        self.started_at = time.time()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._listeners: list[Listener] = list(listeners)
        self._call_observers: list[CallObserver] = list(call_observers)
        self._batchers: dict[str, MicroBatcher[Any, Any]] = {}
        self._uncounted = 0  # > 0 while a rehearsal runs (see uncounted)

    # ---- registration and loading ----------------------------------------------------------
    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(meta)`` after every load, failure, reload and unload (e.g. logs)."""
        self._listeners.append(callback)

    def _notify(self, meta: ModelMetadata) -> None:
        for callback in self._listeners:
            try:
                callback(meta)
            except Exception:  # a listener must never break loading
                log.exception("registry listener failed")

    def register(self, spec: ModelSpec) -> ModelMetadata:
        """Add ``spec`` without loading it (UNLOADED; lazy models stay so until first use)."""
        with self._lock:
            if spec.name in self._entries:
                return self._entries[spec.name].meta
            meta = ModelMetadata(
                name=spec.name,
                family=spec.family,
                version=spec.version,
                required=spec.required,
                lazy=spec.lazy,
                fallback=spec.fallback or None,
                queue=spec.queue,
            )
            self._entries[spec.name] = _Entry(spec=spec, meta=meta)

            return meta

    def load_all(self, specs: Iterable[ModelSpec]) -> dict[str, ModelMetadata]:
        """Register every spec and load the eager ones in parallel; never raises for one model.

        The thread pool is created here, in the calling process, so that a forked pool process
        never inherits a parent's loader threads.
        """
        specs = list(specs)
        for spec in specs:
            self.register(spec)
        eager = [
            s
            for s in specs
            if not s.lazy
            and self._entries[s.name].meta.status in (ModelState.UNLOADED, ModelState.FAILED)
        ]
        if eager:
            workers = max(1, min(self.loader_threads, len(eager)))
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-loader")
            try:
                futures = {
                    s.name: pool.submit(self._load_entry, self._entries[s.name]) for s in eager
                }
                self._wait_all(futures)
            finally:
                # A hung load keeps its thread; don't wait for it (its result is discarded).
                pool.shutdown(wait=False, cancel_futures=True)
        return {name: e.meta for name, e in self._entries.items()}

    def _wait_all(self, futures: dict[str, Future[Model]]) -> None:
        """Wait for every load; fail one that runs past LOAD_TIMEOUT_SECONDS from its own start
        (a load queued behind busy loader threads is not charged for the wait, but the whole
        wait is capped so that hung loaders cannot block the process forever)."""
        rounds = -(-len(futures) // max(1, self.loader_threads))
        cap = self.load_timeout * (rounds + 1)
        if self.start_deadline is not None:
            cap = min(cap, self.start_deadline)
        hard_deadline = time.monotonic() + cap
        pending = dict(futures)
        while pending:
            wait(list(pending.values()), timeout=0.05, return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for name, future in list(pending.items()):
                entry = self._entries[name]
                started = entry.started
                if future.done():
                    pending.pop(name)
                elif (started is not None and now - started > self.load_timeout) or (
                    now > hard_deadline
                ):
                    pending.pop(name)
                    with self._lock:
                        entry.abandoned = True
                        entry.generation += 1
                    self._fail(
                        entry,
                        LoadTimeout(
                            f"model {name!r} did not load within {self.load_timeout:g} s "
                            "(LOAD_TIMEOUT_SECONDS)"
                        ),
                    )

    def context_for(self, cls: type[Model]) -> ModelContext:
        """What a model of class ``cls`` is given: its device, the thread budget, defaults."""
        return ModelContext(
            device=self.device if cls.uses_device else "cpu",
            threads=self.threads,
            defaults=self.option_defaults,
        )

    def _build(self, spec: ModelSpec) -> tuple[Model, float, float]:
        cls = family_class(spec.family, spec.implementation)
        model = cls(spec, self.context_for(cls))
        rss0, t0 = _rss_bytes(), time.perf_counter()
        model.load()
        if self.warmup:
            model.warmup()
        seconds = time.perf_counter() - t0
        return model, seconds, (_rss_bytes() - rss0) / 2**20

    def _load_entry(self, entry: _Entry) -> Model:
        meta = entry.meta
        with entry.load_lock:
            if entry.model is not None:  # a concurrent first caller of a lazy model loaded it
                return entry.model
            with self._lock:
                meta.status, meta.error = ModelState.LOADING, None
                entry.started = time.monotonic()
                entry.generation += 1
                generation = entry.generation
            self._notify(meta)
            try:
                model, seconds, mem = self._build(entry.spec)
            except Exception as exc:
                with self._lock:
                    current = entry.generation == generation
                if current:  # a load abandoned after its timeout must not overwrite newer state
                    self._fail(entry, exc)
                raise
            with self._lock:
                if entry.generation != generation or meta.status is not ModelState.LOADING:
                    model.unload()  # timed out (or reloaded) meanwhile: discard
                    raise LoadTimeout(meta.error or f"model {meta.name!r} load abandoned")
                entry.model = model
                meta.status, meta.loaded_at = ModelState.READY, time.time()
                meta.load_seconds, meta.memory_delta_mb = round(seconds, 4), round(mem, 1)
                meta.device, meta.details = model.device, model.describe()
            self._notify(meta)
            return model

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        with self._lock:
            entry.meta.status = ModelState.FAILED
            entry.meta.error = f"{type(exc).__name__}: {exc}"
            entry.model = None
        self._notify(entry.meta)

    def reload(self, spec: ModelSpec) -> ReloadResult:
        """Load ``spec`` beside the serving version, swap atomically, free the old one.

        On failure the old version keeps serving and the error is returned (and recorded as
        ``reload_error``).
        """
        with self._lock:
            entry = self._entries.get(spec.name)
        if entry is None:
            self.register(spec)
            entry = self._entries[spec.name]
        old_version = entry.meta.version if entry.model is not None else None
        outcome = ReloadResult(model=spec.name, old_version=old_version, new_version=spec.version)
        # One load or reload of a model at a time, never interleaved; a load that hangs must not
        # make the reload (and whoever waits on it) hang too. A load abandoned after its timeout
        # still holds its lock in a stuck thread: give the entry a fresh one (the stuck load's
        # result is discarded when it ends, see _load_entry).
        with self._lock:
            entry.generation += 1  # void any straggling load of this model
            if entry.abandoned:
                entry.load_lock, entry.abandoned = threading.Lock(), False
        if not entry.load_lock.acquire(timeout=self.load_timeout):
            outcome.error = (
                f"ReloadRefused: another load of {spec.name!r} is still running "
                f"after {self.load_timeout:g} s"
            )
            with self._lock:
                entry.meta.reload_error = outcome.error
            self._notify(entry.meta)
            return outcome
        try:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-reload")
            error: str | None = None
            try:
                future = pool.submit(self._build, spec)
                model, seconds, mem = future.result(timeout=self.load_timeout)
            except FutureTimeout:
                error = f"LoadTimeout: reload of {spec.key} exceeded {self.load_timeout:g} s"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            if error is not None:
                with self._lock:
                    entry.meta.reload_error = error
                    if entry.model is None:  # nothing to keep serving
                        entry.meta.status, entry.meta.error = ModelState.FAILED, error
                outcome.error = error
                self._notify(entry.meta)
                return outcome
            with self._lock:
                old = entry.model
                entry.spec, entry.model = spec, model
                meta = entry.meta
                meta.version, meta.family, meta.status = spec.version, spec.family, ModelState.READY
                meta.fallback = spec.fallback or None
                meta.loaded_at, meta.load_seconds = time.time(), round(seconds, 4)
                meta.memory_delta_mb, meta.error, meta.reload_error = round(mem, 1), None, None
                meta.device, meta.details = model.device, model.describe()
            # The old instance is not unloaded here: a task that fetched it just before the swap
            # may still be running on it. Dropping the registry's reference frees it as soon as
            # the last such task returns.
            del old
            self._notify(meta)
            outcome.ok, outcome.seconds = True, round(seconds, 4)
            return outcome
        finally:
            entry.load_lock.release()

    def after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held one at fork time, and
        it would never be released in the child), and no batchers (their threads stayed behind)."""
        self._lock = threading.RLock()
        self._batchers = {}
        for entry in self._entries.values():
            entry.load_lock = threading.Lock()
            entry.abandoned = False

    def warm_all(self, *, before_fork: bool = False) -> list[str]:
        """Run each READY model's warm-up; returns the names warmed.

        ``before_fork`` (the copy-on-write parent): only the models whose family's warm-up is
        fork-safe (``Model.warm_before_fork``); what they build is then shared. Without it (a
        pool process after fork): every model not already warmed before the fork.
        """
        with self._lock:
            models = [e.model for e in self._entries.values() if e.model is not None]
        warmed = []
        for model in models:
            if before_fork and not model.warm_before_fork:
                continue
            if not before_fork and model.warmed_before_fork:
                continue
            try:
                model.warmup()
            except Exception:
                log.exception("warm-up of %s failed", model.name)
                continue
            model.warmed_before_fork = before_fork
            warmed.append(model.name)
        return warmed

    def close(self) -> None:
        """Process shutdown: stop the micro-batchers, unload every model."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
            entries = list(self._entries.values())
        for batcher in batchers:
            batcher.close()
        for entry in entries:
            model, entry.model = entry.model, None
            if model is not None:
                try:
                    model.unload()
                except Exception:
                    log.exception("unload of %s failed", entry.meta.name)
            entry.meta.status = ModelState.UNLOADED
            self._notify(entry.meta)

    # ---- lookup ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def spec(self, name: str) -> ModelSpec:
        return self._entry(name).spec

    def metadata(self, name: str) -> ModelMetadata:
        return self._entry(name).meta

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(name, list(self._entries))
            return entry

    def get(self, name: str) -> Model:
        """The READY model ``name``; loads a lazy model on first use. Raises if not READY.

        A lazy model whose first load failed stays FAILED (each request would otherwise pay for
        a failing load) until a reload succeeds.
        """
        entry = self._entry(name)
        model = entry.model
        if model is not None:
            return model
        if entry.spec.lazy and entry.meta.status is not ModelState.FAILED:
            try:
                return self._load_entry(entry)
            except Exception:
                pass  # recorded; fall through to the not-ready error
        meta = entry.meta
        raise ModelNotReady(name, str(meta.status), meta.error)

    def inference_limit(self, name: str) -> float:
        """Seconds a prediction of ``name`` may take: its ``inference_timeout_s`` option, else
        the registry's default (INFERENCE_TIMEOUT_SECONDS)."""
        with self._lock:
            entry = self._entries.get(name)
        option = entry.spec.options.get("inference_timeout_s") if entry is not None else None
        return float(option) if option else self.inference_timeout

    def ready_fallback(self, name: str) -> Model | None:
        """The declared fallback of ``name`` if it can answer now, else None."""
        fallback = self._entry(name).spec.fallback
        if not fallback:
            return None
        try:
            return self.get(fallback)
        except (ModelNotFound, ModelNotReady):
            return None

    def get_with_fallback(self, name: str) -> tuple[Model, bool]:
        """``(model, used_fallback)``: the model, else its declared fallback, else raise."""
        try:
            return self.get(name), False
        except ModelNotReady:
            fallback = self._entry(name).spec.fallback
            if not fallback:
                raise
            return self.get(fallback), True

    # ---- micro-batching --------------------------------------------------------------------
    def batches(self, name: str) -> bool:
        """Whether the model ``name`` (as it serves now, or its fallback) batches requests."""
        try:
            return bool(type(self.get_with_fallback(name)[0]).batches)
        except (ModelNotFound, ModelNotReady):
            return False

    def batcher(self, name: str, fn: Callable[[list[Any]], list[Any]]) -> MicroBatcher[Any, Any]:
        """This process's micro-batcher for model ``name`` (created on first use, with ``fn`` as
        its batch function). Needs a ``batching`` policy (the threads pool)."""
        with self._lock:
            found = self._batchers.get(name)
            if found is not None:
                return found
            policy = self.batching or BatchPolicy(threads=self.threads)
            try:
                device = self.get_with_fallback(name)[0].device
            except Exception:  # not loaded (yet): plan for the CPU
                device = "cpu"
            lanes, per_lane = policy.plan(device)
            limit = self.inference_limit(name)

            def lane_init() -> None:
                # OpenMP thread counts are per calling thread: each lane runs its forward
                # passes on its share of the process's threads.
                if lanes > 1 and "torch" in sys.modules:
                    sys.modules["torch"].set_num_threads(per_lane)

            batcher: MicroBatcher[Any, Any] = MicroBatcher(
                fn,
                max_size=policy.max_size,
                window=policy.window,
                name=f"{name}-batcher",
                lanes=lanes,
                lane_init=lane_init,
                stuck_after=limit,
                on_timeout=lambda: InferenceTimeout(name, None, limit),
            )
            self._batchers[name] = batcher
        log.info(
            "%s micro-batcher: %d lane(s) x %d torch thread(s), up to %d items per batch, "
            "window %.1f ms",
            name,
            lanes,
            per_lane,
            policy.max_size,
            policy.window * 1000,
        )
        return batcher

    # ---- counting --------------------------------------------------------------------------
    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Calls made meanwhile (a rehearsal before READY) are not counted as served."""
        self._uncounted += 1
        try:
            yield
        finally:
            self._uncounted -= 1

    def observe(self, name: str, seconds: float, ok: bool) -> None:
        """Record one served call of ``name`` (serving counters and the call observers)."""
        if self._uncounted:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.meta.observe(seconds, ok)
            version = entry.meta.version
        for observer in self._call_observers:
            observer(name, version, seconds, ok)

    # ---- health ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: every required model READY; optional ones READY or covered by a
        READY fallback; lazy models count as ready until they fail."""
        reasons: list[str] = []
        with self._lock:
            for name, entry in sorted(self._entries.items()):
                meta = entry.meta
                if meta.status is ModelState.READY or (
                    meta.lazy and meta.status is ModelState.UNLOADED
                ):
                    continue
                if not meta.required and meta.fallback:
                    fb = self._entries.get(meta.fallback)
                    if fb is not None and fb.meta.status is ModelState.READY:
                        continue
                if not meta.required and not meta.fallback and meta.status is ModelState.FAILED:
                    continue
                why = f": {meta.error}" if meta.error else ""
                reasons.append(f"{name} is {meta.status}{why}")
        return not reasons, reasons

    def snapshot(self) -> ProcessSnapshot:
        """The state of this process: models, readiness, host, pid, micro-batching figures."""
        ready, reasons = self.readiness()
        with self._lock:
            models = {name: e.meta.status_record() for name, e in sorted(self._entries.items())}
            batchers = dict(self._batchers)
        host = socket.gethostname()
        return ProcessSnapshot(
            node=self.node or host,
            host=host,
            pid=os.getpid(),
            started_at=self.started_at,
            ready=ready,
            not_ready_reasons=reasons,
            models=models,
            unlisted_artifacts=list(self.unlisted),
            manifest_problems=dict(self.manifest_problems),
            stats={f"{name}_batching": b.stats() for name, b in batchers.items()},
        )


_registry: ModelRegistry | None = None
_registry_lock = threading.Lock()


def get_registry() -> ModelRegistry:
    """This process's registry (Celery's process model forces one per process)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = ModelRegistry()
        return _registry


def set_registry(registry: ModelRegistry) -> ModelRegistry:
    """Install ``registry`` as this process's registry (worker start-up, tests)."""
    global _registry
    with _registry_lock:
        _registry = registry
    return registry
