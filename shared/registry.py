"""Per-process, thread-safe model registry: load, look up, split, swap, unload, count.

Rules (after Triton and MLServer): a model version is registered LOADING before it loads and
ends READY or FAILED(reason). A model may serve several loaded versions at once, each with a
weight (its share of requests: an A/B split); one version with all the weight is the usual case.
A reload loads the new version beside the old one and moves the weight to it atomically; a failed
reload keeps the old version serving and records the error. A version that loses its weight is
unloaded once the requests running on it end. Lookups raise ModelNotFound or ModelNotReady naming
the model, its state and the version.

Lazy models load on first use. With a memory budget (``memory_budget_mb``), a lazy load that
would pass it first evicts the least recently used lazy model that has no request in flight;
eager and required models are never evicted. A failed lazy load is remembered with its reason
and tried again only after ``lazy_retry_seconds``.

The registry is given its configuration (device, thread budget, time limits, option defaults,
micro-batching policy, memory budget) and its observers (listeners for state changes, e.g. logs
and metrics; call observers for served calls) by whoever builds it; it reads no global settings
and does not import Celery.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from shared import heap
from shared.batching import BatchPolicy, MicroBatcher
from shared.errors import InferenceTimeout, LoadTimeout, ModelNotFound, ModelNotReady
from shared.families import Model, ModelContext, family_class
from shared.manifest import ModelSpec
from shared.records import ModelStatus, ProcessSnapshot, ReloadResult, VersionStatus

log = logging.getLogger("modelworkers.registry")
LATENCY_WINDOW = 1024

Listener = Callable[["ModelMetadata"], None]
EventObserver = Callable[[str, "ModelMetadata"], None]  # "loaded" | "evicted", the version
CallObserver = Callable[[str, str, float, bool], None]  # model, version, seconds, ok


class ModelState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    UNLOADED = "UNLOADED"


def _artifact_bytes(spec: ModelSpec) -> int:
    """Size on disk of a version's artifact: the first guess of its memory, before a load."""
    path = Path(spec.location) if spec.location else None
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class ModelMetadata:
    """What the registry knows about one version of a model in this process (mutable, behind
    the registry's lock). ``ModelRegistry.metadata(name)`` is the serving version's."""

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


@dataclass(eq=False)  # compared and hashed by identity (a dict key while loading)
class _Version:
    """One version of a model in this process: its spec, instance and bookkeeping."""

    spec: ModelSpec
    meta: ModelMetadata
    model: Model | None = None
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    started: float | None = None  # monotonic start of the current load
    abandoned: bool = False  # its load timed out; the loader thread may still be stuck
    generation: int = 0  # bumped by every load, reload and abandon: only the current one writes
    in_flight: int = 0  # requests running on it now
    last_used: float = 0.0  # monotonic, for the least-recently-used eviction
    failed_at: float | None = None  # monotonic time of its last failed load
    memory_mb: float | None = None


@dataclass
class _Entry:
    """One model name: its versions, and how requests are shared among them."""

    name: str
    spec: ModelSpec  # the serving version's (required, lazy, fallback, queue are the model's)
    versions: dict[str, _Version] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)  # version -> share of requests
    unloaded: bool = False  # unloaded on purpose; `load` brings it back
    loads: int = 0
    evictions: int = 0

    @property
    def serving(self) -> str:
        """The version with the largest share (the model's reported version)."""
        if self.weights:
            return max(self.weights, key=lambda v: (self.weights[v], v == self.spec.version))
        return self.spec.version

    def version(self, name: str | None = None) -> _Version:
        return self.versions[name or self.serving]


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
        memory_budget_mb: float | None = None,
        lazy_retry_seconds: float = 60.0,
        node: str = "",
        listeners: Sequence[Listener] = (),
        call_observers: Sequence[CallObserver] = (),
        event_observers: Sequence[EventObserver] = (),
        unlisted: Sequence[str] = (),
        manifest_problems: Mapping[str, str] | None = None,
    ) -> None:
        """``device``: where models that run on a device go (MODEL_DEVICE); ``threads``: the
        process's torch/BLAS thread budget; ``option_defaults``: deployment defaults for model
        options a model file does not set; ``batching``: micro-batching for concurrent requests
        in this process (None: none, as in a prefork pool process); ``memory_budget_mb``: the
        memory the loaded models may use together (None: no budget; then loads may overlap and
        their memory figures are approximate)."""
        self.device = device
        self.threads = threads
        self.load_timeout = load_timeout
        self.loader_threads = loader_threads
        self.warmup = warmup
        self.start_deadline = start_deadline
        self.inference_timeout = inference_timeout
        self.option_defaults = dict(option_defaults or {})
        self.batching = batching
        self.memory_budget_mb = memory_budget_mb
        self.lazy_retry_seconds = lazy_retry_seconds
        self.node = node
        self.unlisted = list(unlisted)
        self.manifest_problems = dict(manifest_problems or {})
        self.started_at = time.time()
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # notified when a request ends
        # Loads whose memory is measured one at a time (with a budget): an RSS difference over
        # a load is then that load's alone.
        self._measure_lock = threading.Lock()
        self._overlapped = False  # some memory figure came from loads that ran side by side
        self._listeners: list[Listener] = list(listeners)
        self._call_observers: list[CallObserver] = list(call_observers)
        self._event_observers: list[EventObserver] = list(event_observers)
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

    def _event(self, kind: str, meta: ModelMetadata) -> None:
        for observer in self._event_observers:
            try:
                observer(kind, meta)
            except Exception:
                log.exception("registry event observer failed")

    def _meta_for(self, spec: ModelSpec) -> ModelMetadata:
        return ModelMetadata(
            name=spec.name,
            family=spec.family,
            version=spec.version,
            required=spec.required,
            lazy=spec.lazy,
            fallback=spec.fallback or None,
            queue=spec.queue,
        )

    def register(self, spec: ModelSpec, *, serve: bool = True) -> ModelMetadata:
        """Add ``spec`` without loading it (UNLOADED; lazy models stay so until first use).
        ``serve``: it takes the model's requests (another registered version keeps them)."""
        with self._lock:
            entry = self._entries.get(spec.name)
            if entry is None:
                entry = self._entries[spec.name] = _Entry(name=spec.name, spec=spec)
            if spec.version not in entry.versions:
                entry.versions[spec.version] = _Version(spec=spec, meta=self._meta_for(spec))
            if serve and not entry.weights:
                entry.weights = {spec.version: 100}
                entry.spec = spec
            return entry.versions[spec.version].meta

    def load_all(self, specs: Iterable[ModelSpec]) -> dict[str, ModelMetadata]:
        """Register every spec and load the eager ones in parallel (one at a time with a memory
        budget); never raises for one model.

        The thread pool is created here, in the calling process, so that a forked pool process
        never inherits a parent's loader threads.
        """
        specs = list(specs)
        for spec in specs:
            self.register(spec)
        eager = [
            self._entries[s.name].versions[s.version]
            for s in specs
            if not s.lazy
            and self._entries[s.name].versions[s.version].meta.status
            in (ModelState.UNLOADED, ModelState.FAILED)
        ]
        if eager:
            workers = 1 if self.memory_budget_mb else max(1, min(self.loader_threads, len(eager)))
            self._overlapped = self._overlapped or workers > 1
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="model-loader")
            try:
                futures = {v: pool.submit(self._load_version, v) for v in eager}
                self._wait_all(futures)
            finally:
                # A hung load keeps its thread; don't wait for it (its result is discarded).
                pool.shutdown(wait=False, cancel_futures=True)
        return {name: e.version().meta for name, e in self._entries.items()}

    def _wait_all(self, futures: dict[_Version, Future[Model]]) -> None:
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
            for version, future in list(pending.items()):
                started = version.started
                if future.done():
                    pending.pop(version)
                elif (started is not None and now - started > self.load_timeout) or (
                    now > hard_deadline
                ):
                    pending.pop(version)
                    with self._lock:
                        version.abandoned = True
                        version.generation += 1
                    self._fail(
                        version,
                        LoadTimeout(
                            f"model {version.meta.name!r} did not load within "
                            f"{self.load_timeout:g} s (MODELWORKERS_LOAD_TIMEOUT_SECONDS)"
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
        """A loaded (and warmed) instance, its load seconds and its memory in MiB: what the
        family reports (``memory_bytes``), else the process's RSS growth over the load."""
        cls = family_class(spec.family, spec.implementation)
        model = cls(spec, self.context_for(cls))
        measured = self._measure_lock if self.memory_budget_mb else nullcontext()
        with measured:
            rss0, t0 = heap.resident_bytes(), time.perf_counter()
            model.load()
            if self.warmup:
                model.warmup()
            seconds = time.perf_counter() - t0
            # what the load keeps, not its passing buffers (read chunks, a warm-up's arrays)
            heap.give_back_memory()
            grown = (heap.resident_bytes() - rss0) / 2**20

        reported = model.memory_bytes()
        return model, seconds, (reported / 2**20 if reported is not None else max(0.0, grown))

    def _load_version(self, version: _Version) -> Model:
        with version.load_lock:
            return self._load_locked(version)

    def _load_locked(self, version: _Version) -> Model:
        """Load ``version`` (its load lock held by the caller)."""
        meta = version.meta
        if version.model is not None:  # a concurrent first caller of a lazy model loaded it
            return version.model
        with self._lock:
            meta.status, meta.error = ModelState.LOADING, None
            version.started = time.monotonic()
            version.generation += 1
            generation = version.generation
        self._notify(meta)
        try:
            model, seconds, mem = self._build(version.spec)
        except Exception as exc:
            with self._lock:
                current = version.generation == generation
            if current:  # a load abandoned after its timeout must not overwrite newer state
                self._fail(version, exc)
            raise
        with self._lock:
            if version.generation != generation or meta.status is not ModelState.LOADING:
                model.unload()  # timed out (or reloaded) meanwhile: discard
                raise LoadTimeout(meta.error or f"model {meta.name!r} load abandoned")
            version.model, version.failed_at = model, None
            version.memory_mb = round(mem, 1)
            self._entries[meta.name].loads += 1
            meta.status, meta.loaded_at = ModelState.READY, time.time()
            meta.load_seconds, meta.memory_delta_mb = round(seconds, 4), round(mem, 1)
            meta.device, meta.details = model.device, model.describe()
        self._notify(meta)
        self._event("loaded", meta)
        return model

    def _fail(self, version: _Version, exc: BaseException) -> None:
        with self._lock:
            version.meta.status = ModelState.FAILED
            version.meta.error = f"{type(exc).__name__}: {exc}"
            version.model = None
            version.failed_at = time.monotonic()
        self._notify(version.meta)

    def _load_beside(self, spec: ModelSpec) -> tuple[_Version, str | None]:
        """Load ``spec`` as a new instance beside whatever serves (bounded by the load timeout);
        returns its version and an error text (None: loaded)."""
        self.register(spec, serve=False)
        with self._lock:
            entry = self._entries[spec.name]
            version = entry.versions[spec.version]
            version.spec = spec
            version.generation += 1  # void any straggling load of this version
            if version.abandoned:
                version.load_lock, version.abandoned = threading.Lock(), False
        if version.model is not None and version.meta.status is ModelState.READY:
            return version, None  # already loaded (a split that keeps a version)
        if not version.load_lock.acquire(timeout=self.load_timeout):
            return version, (
                f"ReloadRefused: another load of {spec.name!r} is still running "
                f"after {self.load_timeout:g} s"
            )
        try:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-reload")
            try:
                self._make_room(entry, spec)
                model, seconds, mem = pool.submit(self._build, spec).result(
                    timeout=self.load_timeout
                )
            except FutureTimeout:
                return version, f"LoadTimeout: load of {spec.key} exceeded {self.load_timeout:g} s"
            except Exception as exc:
                return version, f"{type(exc).__name__}: {exc}"
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                old, version.model = version.model, model
                version.memory_mb, version.failed_at = round(mem, 1), None
                entry.loads += 1
                meta = version.meta
                meta.family, meta.status = spec.family, ModelState.READY
                meta.fallback, meta.queue = spec.fallback or None, spec.queue
                meta.loaded_at, meta.load_seconds = time.time(), round(seconds, 4)
                meta.memory_delta_mb, meta.error, meta.reload_error = round(mem, 1), None, None
                meta.device, meta.details = model.device, model.describe()
            del old
            self._notify(meta)
            self._event("loaded", meta)
            return version, None
        finally:
            version.load_lock.release()

    def reload(self, spec: ModelSpec) -> ReloadResult:
        """Load ``spec`` beside the serving version, move every request to it atomically, free
        the old one once its requests end.

        On failure the old version keeps serving and the error is returned (and recorded as
        ``reload_error``).
        """
        with self._lock:
            entry = self._entries.get(spec.name)
            old = entry.serving if entry is not None and entry.weights else None
            old_loaded = (
                old is not None and entry is not None and entry.versions[old].model is not None
            )
        outcome = ReloadResult(
            model=spec.name, old_version=old if old_loaded else None, new_version=spec.version
        )
        version, error = self._load_beside(spec)
        if error is not None:
            return self._refused(spec.name, outcome, error)
        self._set_weights(spec.name, {spec.version: 100})
        outcome.ok, outcome.seconds = True, version.meta.load_seconds
        return outcome

    def _refused(self, name: str, outcome: ReloadResult, error: str) -> ReloadResult:
        """A reload, load or split that failed: the serving version keeps serving."""
        with self._lock:
            entry = self._entries[name]
            serving = entry.versions.get(entry.serving)
            meta = serving.meta if serving is not None else None
            if meta is not None:
                meta.reload_error = error
                if serving is not None and serving.model is None and not entry.unloaded:
                    meta.status, meta.error = ModelState.FAILED, error  # nothing else serves
            target = entry.versions.get(outcome.new_version or "")
            if target is not None and target is not serving and target.model is None:
                target.meta.status, target.meta.error = ModelState.FAILED, error
        outcome.error = error
        if meta is not None:
            self._notify(meta)
        return outcome

    def split(
        self, name: str, specs: Mapping[str, ModelSpec], weights: Mapping[str, int]
    ) -> ReloadResult:
        """Serve ``name`` from several versions at once, each with its share of requests
        (``weights``, e.g. 90 / 10; the specs of the versions by version). Missing versions are
        loaded beside first; versions left out are unloaded once idle. All or nothing."""
        with self._lock:
            entry = self._entries.get(name)
            before = dict(entry.weights) if entry is not None else {}
        outcome = ReloadResult(
            model=name,
            old_version=",".join(f"{v}={w}" for v, w in before.items()) or None,
            new_version=",".join(f"{v}={w}" for v, w in weights.items()),
        )
        t0 = time.perf_counter()
        for version in weights:
            _, error = self._load_beside(specs[version])
            if error is not None:
                return self._refused(name, outcome, error)
        self._set_weights(name, dict(weights))
        outcome.ok, outcome.seconds = True, round(time.perf_counter() - t0, 4)
        return outcome

    def load(self, spec: ModelSpec) -> ReloadResult:
        """Load ``spec`` and serve every request of its model with it (the model may be new to
        this process, or unloaded before); the version serving before is freed once idle."""
        with self._lock:
            entry = self._entries.get(spec.name)
            if entry is not None:
                entry.unloaded = False
        return self.reload(spec)

    def _set_weights(self, name: str, weights: dict[str, int]) -> None:
        """Make ``weights`` the model's split, atomically; retire the versions left out."""
        with self._lock:
            entry = self._entries[name]
            entry.weights = weights
            entry.unloaded = False
            entry.spec = entry.versions[entry.serving].spec
            retired = [v for k, v in entry.versions.items() if k not in weights]
        for version in retired:
            self._unload_version(entry, version, wait=False)
        self._notify(entry.version().meta)

    def _unload_version(
        self, entry: _Entry, version: _Version, *, wait: bool, timeout: float = 0.0
    ) -> bool:
        """Free ``version`` once no request runs on it (waiting up to ``timeout`` with
        ``wait``; else a request still running on it keeps the instance alive until it ends,
        and the memory is freed then). Returns whether it is unloaded now."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while wait and version.in_flight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, deadline - time.monotonic()))
            if wait and version.in_flight:
                return False
            model, version.model = version.model, None
            version.meta.status = ModelState.UNLOADED
            version.memory_mb = None
            if (
                version.spec.version not in entry.weights
                and version.spec.version != entry.spec.version
            ):
                entry.versions.pop(version.spec.version, None)
        if model is not None:
            try:
                model.unload()
            except Exception:
                log.exception("unload of %s@%s failed", version.meta.name, version.meta.version)
            del model
            heap.give_back_memory()
        self._notify(version.meta)
        return True

    def unload(self, name: str, timeout: float = 60.0) -> ReloadResult:
        """Stop serving ``name``: new requests get ModelNotReady (or its fallback) at once;
        the versions are freed when the requests running on them end (waiting up to
        ``timeout``). ``load`` brings it back."""
        entry = self._entry(name)
        with self._lock:
            entry.unloaded = True
            versions = list(entry.versions.values())
            serving = entry.serving
        outcome = ReloadResult(model=name, old_version=serving, new_version=None)
        t0 = time.perf_counter()
        for version in versions:
            if not self._unload_version(entry, version, wait=True, timeout=timeout):
                outcome.error = (
                    f"{name}@{version.spec.version} still had {version.in_flight} request(s) "
                    f"running after {timeout:g} s; it is freed when they end"
                )
                self._unload_version(entry, version, wait=False)
        outcome.ok = outcome.error is None
        outcome.seconds = round(time.perf_counter() - t0, 4)
        return outcome

    # ---- the memory budget -----------------------------------------------------------------
    def models_memory_mb(self) -> float:
        with self._lock:
            return sum(
                v.memory_mb or 0.0
                for e in self._entries.values()
                for v in e.versions.values()
                if v.model is not None
            )

    def _make_room(self, entry: _Entry, spec: ModelSpec) -> None:
        """Before loading ``spec``: evict least recently used lazy models (none with requests in
        flight, never eager or required ones, never ``entry``'s) until it fits the budget."""
        if not self.memory_budget_mb:
            return
        known = entry.versions.get(spec.version)
        need = (known.memory_mb if known is not None and known.memory_mb else None) or (
            _artifact_bytes(spec) / 2**20
        )
        while True:
            with self._lock:
                if self.models_memory_mb() + need <= self.memory_budget_mb:
                    return
                candidates = [
                    (v.last_used, e, v)
                    for e in self._entries.values()
                    if e is not entry and e.spec.lazy and not e.spec.required
                    for v in e.versions.values()
                    if v.model is not None and v.in_flight == 0
                ]
                if not candidates:
                    log.warning(
                        "loading %s passes the memory budget of %g MiB: no lazy model is idle "
                        "to evict",
                        spec.key,
                        self.memory_budget_mb,
                    )
                    return
                _, victim_entry, victim = min(candidates, key=lambda c: c[0])
                victim_entry.evictions += 1
            log.info(
                "evicting %s (%.1f MiB, least recently used) to load %s within %g MiB",
                victim.spec.key,
                victim.memory_mb or 0.0,
                spec.key,
                self.memory_budget_mb,
            )
            self._event("evicted", victim.meta)
            self._unload_version(victim_entry, victim, wait=False)

    # ---- process life ----------------------------------------------------------------------
    def after_fork(self) -> None:
        """In a forked child: fresh locks (a parent thread may have held one at fork time, and
        it would never be released in the child), and no batchers (their threads stayed behind)."""
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._measure_lock = threading.Lock()
        self._batchers = {}
        for entry in self._entries.values():
            for version in entry.versions.values():
                version.load_lock = threading.Lock()
                version.abandoned = False
                version.in_flight = 0

    def before_fork(self) -> None:
        """In the copy-on-write parent, right before the pool forks: every loaded model drops
        what must not cross a fork (``Model.before_fork``: ONNX Runtime sessions)."""
        with self._lock:
            models = [
                v.model for e in self._entries.values() for v in e.versions.values() if v.model
            ]
        for model in models:
            try:
                model.before_fork()
            except Exception:
                log.exception("before_fork of %s failed", model.name)

    def warm_all(self, *, before_fork: bool = False) -> list[str]:
        """Run each loaded model's warm-up; returns the names warmed.

        ``before_fork`` (the copy-on-write parent): only the models whose family's warm-up is
        fork-safe (``Model.warm_before_fork``); what they build is then shared. Without it (a
        pool process after fork): every model not already warmed before the fork.
        """
        with self._lock:
            models = [
                v.model for e in self._entries.values() for v in e.versions.values() if v.model
            ]
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
            versions = [v for e in self._entries.values() for v in e.versions.values()]
        for batcher in batchers:
            batcher.close()
        for version in versions:
            model, version.model = version.model, None
            if model is not None:
                try:
                    model.unload()
                except Exception:
                    log.exception("unload of %s failed", version.meta.name)
            version.meta.status = ModelState.UNLOADED
            self._notify(version.meta)

    # ---- lookup ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def spec(self, name: str) -> ModelSpec:
        return self._entry(name).spec

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        """The metadata of ``name``'s serving version (or of ``version``)."""
        entry = self._entry(name)
        with self._lock:
            try:
                return entry.version(version).meta
            except KeyError:
                raise ModelNotFound(f"model {name!r} has no version {version!r} here") from None

    def weights(self, name: str) -> dict[str, int]:
        """How ``name``'s requests are shared among its versions (empty: unloaded)."""
        entry = self._entry(name)
        with self._lock:
            return {} if entry.unloaded else dict(entry.weights)

    def _entry(self, name: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(name, list(self._entries))
            return entry

    def _choose(self, entry: _Entry, version: str | None, key: str | None) -> _Version:
        """The version that answers: the pinned one, else by ``key`` (the same key, the same
        version), else at random by weight."""
        if version is not None:
            found = entry.versions.get(version)
            if found is None or (found.model is None and not entry.spec.lazy):
                serving = ", ".join(f"{v}={w}" for v, w in entry.weights.items()) or "none"
                raise ModelNotReady(
                    entry.name, "UNLOADED", f"version {version!r} is not loaded (serving {serving})"
                )
            return found
        weights = entry.weights
        if len(weights) == 1:
            return entry.versions[next(iter(weights))]
        total = sum(weights.values())
        if key is not None:
            digest = hashlib.sha256(f"{entry.name}\0{key}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") % total
        else:
            point = random.randrange(total)
        for name, weight in weights.items():
            if point < weight:
                return entry.versions[name]
            point -= weight
        return entry.versions[entry.serving]  # pragma: no cover - weights sum to total

    def _ready(self, entry: _Entry, version: _Version) -> Model:
        """``version``'s instance; loads a lazy model (within the budget), and keeps a failed
        lazy load's error until the retry interval has passed."""
        model = version.model
        if model is not None:
            return model
        meta = version.meta
        if entry.unloaded:
            raise ModelNotReady(
                entry.name, "UNLOADED", "unloaded (modelworkers load brings it back)"
            )
        if entry.spec.lazy:
            failed = version.failed_at
            if failed is None or time.monotonic() - failed >= self.lazy_retry_seconds:
                # One load for every caller waiting on it; a failure is shared, not retried.
                with version.load_lock:
                    if version.model is not None:  # loaded by a concurrent first caller
                        return version.model
                    if version.failed_at == failed:
                        self._make_room(entry, version.spec)
                        try:
                            return self._load_locked(version)
                        except Exception:
                            pass  # recorded on the version: the not-ready error below
        raise ModelNotReady(entry.name, str(meta.status), meta.error)

    def get(self, name: str, version: str | None = None, key: str | None = None) -> Model:
        """The READY model ``name`` (the version ``version`` or ``key`` picks); loads a lazy
        model on first use. Raises ModelNotReady if it cannot serve."""
        entry = self._entry(name)
        return self._ready(entry, self._choose(entry, version, key))

    def choose(self, name: str, key: str | None = None) -> str | None:
        """The version that will answer a request for ``name`` (by ``key``, else at random by
        weight); None when the model serves nothing (unloaded)."""
        entry = self._entry(name)
        with self._lock:
            if entry.unloaded or not entry.weights:
                return None
            return self._choose(entry, None, key).spec.version

    def serving_version(self, name: str) -> str:
        """The version with the largest share of ``name``'s requests."""
        entry = self._entry(name)
        with self._lock:
            return entry.serving

    @contextmanager
    def use(
        self,
        name: str,
        version: str | None = None,
        key: str | None = None,
        *,
        allow_fallback: bool = True,
    ) -> Iterator[tuple[Model, bool]]:
        """``(model, used_fallback)`` for one request, counted as in flight until the block
        ends (an unload or an eviction waits for it): the model, else its declared fallback."""
        try:
            model = self.get(name, version, key)
            fallback = False
        except ModelNotReady:
            backup = self._entry(name).spec.fallback
            if not backup or not allow_fallback:
                raise
            model, fallback = self.get(backup), True
        held = self._entry(model.name).versions.get(model.version)
        with self._lock:
            if held is not None:
                held.in_flight += 1
                held.last_used = time.monotonic()
        try:
            yield model, fallback
        finally:
            with self._lock:
                if held is not None:
                    held.in_flight -= 1
                    self._idle.notify_all()

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

    def batcher(
        self, name: str, fn: Callable[[list[Any]], list[Any]], *, model: str | None = None
    ) -> MicroBatcher[Any, Any]:
        """This process's micro-batcher ``name`` (created on first use, with ``fn`` as its batch
        function) for the model ``model`` (default: ``name``), planned for its device."""
        model = model or name
        with self._lock:
            found = self._batchers.get(name)
            if found is not None:
                return found
            policy = self.batching or BatchPolicy(threads=self.threads)
            try:
                device = self.get_with_fallback(model)[0].device
            except Exception:  # not loaded (yet): plan for the CPU
                device = "cpu"
            lanes, per_lane = policy.plan(device)
            limit = self.inference_limit(model)

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
                on_timeout=lambda: InferenceTimeout(model, None, limit),
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

    @property
    def counting(self) -> bool:
        """False while calls are not counted as served (see uncounted)."""
        return not self._uncounted

    def observe(self, name: str, seconds: float, ok: bool, version: str | None = None) -> None:
        """Record one served call of ``name`` (``version``: the one that answered; default the
        serving one) in its counters and the call observers."""
        if self._uncounted:
            return
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            found = entry.versions.get(version or entry.serving)
            if found is None:
                return
            found.meta.observe(seconds, ok)
            answered = found.meta.version
        for observer in self._call_observers:
            observer(name, answered, seconds, ok)

    # ---- health ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: every required model READY; optional ones READY or covered by a
        READY fallback; lazy and purposely unloaded models count as ready until they fail."""
        reasons: list[str] = []
        with self._lock:
            for name, entry in sorted(self._entries.items()):
                meta = entry.version().meta
                if (
                    entry.unloaded
                    or (meta.status is ModelState.READY)
                    or (meta.lazy and meta.status is ModelState.UNLOADED)
                ):
                    continue
                if not meta.required and meta.fallback:
                    fb = self._entries.get(meta.fallback)
                    if fb is not None and fb.version().meta.status is ModelState.READY:
                        continue
                if not meta.required and not meta.fallback and meta.status is ModelState.FAILED:
                    continue
                why = f": {meta.error}" if meta.error else ""
                reasons.append(f"{name} is {meta.status}{why}")
        return not reasons, reasons

    def _status(self, entry: _Entry) -> ModelStatus:
        record = entry.version().meta.status_record()
        versions = {
            key: VersionStatus(
                status=str(v.meta.status),
                weight=0 if entry.unloaded else entry.weights.get(key, 0),
                loaded_at=v.meta.loaded_at,
                load_seconds=v.meta.load_seconds,
                memory_mb=v.memory_mb,
                error=v.meta.error,
                calls=v.meta.calls,
                failures=v.meta.failures,
                in_flight=v.in_flight,
                last_used=(time.time() - (time.monotonic() - v.last_used)) if v.last_used else None,
            )
            for key, v in sorted(entry.versions.items())
        }
        if entry.unloaded:
            record.status = str(ModelState.UNLOADED)
        return record.model_copy(
            update={
                "versions": versions,
                "unloaded": entry.unloaded,
                "loads": entry.loads,
                "evictions": entry.evictions,
            }
        )

    def snapshot(self) -> ProcessSnapshot:
        """The state of this process: models, readiness, host, pid, memory, micro-batching."""
        ready, reasons = self.readiness()
        with self._lock:
            models = {name: self._status(e) for name, e in sorted(self._entries.items())}
            batchers = dict(self._batchers)
            memory = self.models_memory_mb()
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
            stats={f"{name}_batching": b.stats() for name, b in batchers.items()}
            | {"heap": heap.stats()},
            memory_budget_mb=self.memory_budget_mb,
            models_memory_mb=round(memory, 1),
            memory_exact=not self._overlapped,
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
