"""Batching in the prefork pool: concurrent single requests share one forward pass.

In the threads pool, concurrent requests meet in one process and its micro-batcher
(``shared.batching``) gathers them. In the prefork pool each request normally goes to a pool
process of its own, one forward pass each. Here the worker's consumer (its main process) gathers
them instead:

* A request for a model whose family batches (``sentiment.analyze``; ``models.predict`` of such
  a model) goes straight to a pool process when one is free, exactly as Celery would send it.
* While every pool process is busy with such requests, the next ones wait in the consumer, per
  model; when a process comes free, up to ``BATCH_MAX_SIZE`` of them go to it as one job
  (:func:`run_batch`). A lone request never waits for a batch to fill.
* In the pool process, each task body is first run to *plan* its model call (its input checks
  included), the planned calls are answered by one ``predict_batch`` per model version, then
  each request runs through Celery's own tracer with its answer ready (``tasks.base``): results,
  errors, events, signals and the result backend are per request, as without batching. With
  TRACING, the shared call is one ``pool_batch`` span linked to each request's send span, and
  each request still has its own ``run`` span, child of its own send span.
* Acknowledgements stay per request (``acks_late``): a pool process killed mid-batch leaves every
  request of the batch unacknowledged, and each is requeued (``reject_on_worker_lost``), then
  runs alone: a redelivered request is never batched, so a poison message cannot take innocent
  requests down with it more than once.
* Prefetch: while batches form, the consumer holds ``BATCH_MAX_SIZE`` more messages than
  ``worker_prefetch_multiplier`` allows, and a batch in a pool process counts as one message,
  as a single task does. With no batch running, the prefetch is Celery's. On RabbitMQ's quorum
  queues the prefetch is per consumer and fixed once the consumer exists (a later
  ``basic.qos`` applies to new consumers only, and quorum queues have no global QoS): there
  the batcher leaves it alone, and a batch gathers at most the messages the prefetch holds
  (PREFETCH_MULTIPLIER x concurrency).

``POOL_BATCHING=false`` turns it off (every request is a pool job of its own).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any
from weakref import ref

from celery.app.trace import fast_trace_task, trace_task_ret
from celery.worker.strategy import default as default_strategy
from kombu.serialization import loads, prepare_accept_content

from shared.families import family_class
from shared.settings import get_settings

log = logging.getLogger("modelworkers.worker")

SENTIMENT_TASKS = frozenset({"sentiment.analyze"})
PREDICT_TASK = "models.predict"


# ---- in the pool process ------------------------------------------------------------------
def run_batch(items: list[tuple[Any, ...]]) -> list[Any]:
    """Run the task messages ``items`` (each the arguments Celery's tracer takes) in this pool
    process, their model calls answered together; one tracer result per item."""
    from celery import current_app

    from tasks.base import answer_planned, answering, plan

    app = current_app
    trace = fast_trace_task if app.use_fast_trace_task else trace_task_ret
    accept = prepare_accept_content(app.conf.accept_content)
    calls = []
    for name, _task_id, _request, body, content_type, content_encoding in items:
        try:
            args, kwargs, _embed = loads(body, content_type, content_encoding, accept=accept)
            calls.append(plan(app.tasks[name], tuple(args), dict(kwargs)))
        except Exception:  # its own run reports the problem
            calls.append(None)
    from shared.registry import get_registry
    from workers.serving import current

    serving = current()
    traced = serving.tracing if serving is not None else None
    try:
        with traced.batch_span([i[2] for i in items]) if traced is not None else nullcontext():
            slots = answer_planned(get_registry(), calls)
    except Exception as exc:  # never lose the batch: each request runs alone
        log.warning("a pool batch could not be answered together: %r", exc)
        slots = [None] * len(items)
    results = []
    for item, slot in zip(items, slots, strict=True):
        with answering(slot):
            results.append(trace(*item))
    return results


# ---- in the worker's main process ---------------------------------------------------------
class _Job:
    """Requests sent to the pool as one job: each request's callbacks, and the batcher told
    once when the job is over."""

    def __init__(self, batcher: PoolBatcher, requests: list[Any]) -> None:
        self.batcher = batcher
        self.requests = requests
        self.over = False

    def done(self) -> None:
        if not self.over:
            self.over = True
            self.batcher.job_done(self)

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        for req in self.requests:
            req.on_accepted(pid, time_accepted)

    def on_success(self, results: Any, **kwargs: Any) -> None:
        try:
            if len(self.requests) == 1:
                self.requests[0].on_success(results, **kwargs)
            else:
                for req, result in zip(self.requests, results, strict=True):
                    req.on_success(result, **kwargs)
        finally:
            self.done()

    def on_failure(self, exc_info: Any, **kwargs: Any) -> None:
        try:
            for req in self.requests:
                if not req.acknowledged:
                    req.on_failure(exc_info, **kwargs)
        finally:
            self.done()

    def on_timeout(self, soft: bool, timeout: float) -> None:
        try:
            for req in self.requests:
                req.on_timeout(soft, timeout)
        finally:
            if not soft:
                self.done()


class PoolBatcher:
    """The consumer's side: which requests wait, and when they go to the pool together."""

    def __init__(
        self, consumer: Any, *, max_size: int, processes: int, batching_models: set[str]
    ) -> None:
        self.consumer = consumer
        self.max_size = max_size
        self.processes = processes
        self.batching_models = batching_models
        self.waiting: dict[str, deque[Any]] = {}
        self.jobs: set[_Job] = set()
        self.held = 0  # prefetch added to Celery's (see the module docstring)
        self._qos: Any = None
        self.static_prefetch = False  # RabbitMQ quorum queues: the prefetch cannot grow
        self.batches_sent = 0
        self.batched_requests = 0

    # -- what batches ---------------------------------------------------------------------
    def key(self, req: Any) -> str | None:
        """The model a request waits for, or None when it goes to the pool alone."""
        if req.delivery_info.get("redelivered"):
            return None  # its last run may have killed a pool process: never with others
        if req.name in SENTIMENT_TASKS:
            return "sentiment"
        if req.name == PREDICT_TASK:
            args, kwargs = req.args, req.kwargs
            model = args[0] if args else kwargs.get("model") if isinstance(kwargs, dict) else None
            if isinstance(model, str) and model in self.batching_models:
                return model
        return None

    # -- the consumer's on_task_request for the batching tasks ---------------------------
    def handle(self, req: Any) -> None:
        key = self.key(req)
        if key is None:
            self.consumer.on_task_request(req)
            return
        self.waiting.setdefault(key, deque()).append(req)
        self.dispatch()

    def dispatch(self) -> None:
        """Send waiting requests while a pool process is free: the longest line first."""
        while len(self.jobs) < self.processes:
            lines = [line for line in self.waiting.values() if line]
            if not lines:
                break
            line = max(lines, key=len)
            requests: list[Any] = []
            while line and len(requests) < self.max_size:
                req = line.popleft()
                if not req.revoked():  # revoked() acknowledges and reports it
                    requests.append(req)
            if requests:
                self.send(requests)
        self.adjust_prefetch()

    def send(self, requests: list[Any]) -> None:
        job = _Job(self, requests)
        app = self.consumer.app
        trace = fast_trace_task if app.use_fast_trace_task else trace_task_ret
        items = [
            (r.type, r.id, r.request_dict, r.body, r.content_type, r.content_encoding)
            for r in requests
        ]
        limits = [r.time_limits for r in requests]
        hard = [h or r.task.time_limit for (h, _), r in zip(limits, requests, strict=True)]
        soft = [s or r.task.soft_time_limit for (_, s), r in zip(limits, requests, strict=True)]
        target: Callable[..., Any]
        args: tuple[Any, ...]
        if len(requests) == 1:
            target, args = trace, items[0]
        else:
            target, args = run_batch, (items,)
            self.batches_sent += 1
            self.batched_requests += len(requests)
        self.jobs.add(job)
        try:
            result = self.consumer.pool.apply_async(
                target,
                args=args,
                accept_callback=job.on_accepted,
                timeout_callback=job.on_timeout,
                callback=job.on_success,
                error_callback=job.on_failure,
                soft_timeout=max((s for s in soft if s), default=None),
                timeout=max((h for h in hard if h), default=None),
                correlation_id=requests[0].id,
            )
        except BaseException:
            self.jobs.discard(job)
            raise
        for req in requests:
            req._apply_result = ref(result) if result is not None else None

    def job_done(self, job: _Job) -> None:
        self.jobs.discard(job)
        self.dispatch()

    # -- prefetch -------------------------------------------------------------------------
    def adjust_prefetch(self) -> None:
        """Hold ``max_size`` more prefetch while every pool process has a job of ours (so that
        the next requests can wait here), and one less per request beyond the first of each
        job (a job counts as one message)."""
        qos = getattr(self.consumer, "qos", None)
        if qos is None or self.static_prefetch:
            return
        if qos is not self._qos:  # a new connection: Celery's prefetch again
            self._qos, self.held = qos, 0
        busy = len(self.jobs) >= self.processes or any(self.waiting.values())
        want = sum(len(j.requests) - 1 for j in self.jobs) + (self.max_size if busy else 0)
        if want > self.held:
            qos.increment_eventually(want - self.held)
        elif want < self.held:
            qos.decrement_eventually(self.held - want)
        self.held = want

    def stats(self) -> dict[str, int]:
        return {
            "batches": self.batches_sent,
            "batched_requests": self.batched_requests,
            "waiting": sum(len(line) for line in self.waiting.values()),
            "jobs": len(self.jobs),
        }


class _Intercepted:
    """The consumer as Celery's default strategy sees it, with our ``on_task_request``."""

    def __init__(self, consumer: Any, handle: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self.on_task_request = handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def batching_models() -> set[str]:
    """The models of this node whose family batches (known from the model repository)."""
    from workers.serving import current

    serving = current()
    manifest = serving.manifest if serving is not None else None
    found: set[str] = set()
    for spec in manifest.specs if manifest is not None else []:
        try:
            if family_class(spec.family, spec.implementation).batches:
                found.add(spec.name)
        except Exception:  # an unknown family fails that model's load, not the worker
            continue
    return found


def quorum_queues(consumer: Any) -> bool:
    """Whether this consumer takes from RabbitMQ quorum queues (Celery's own detection)."""
    from celery.utils.quorum_queues import detect_quorum_queues

    from shared.urls import is_amqp

    driver = "amqp" if is_amqp(str(consumer.app.conf.broker_url or "")) else "redis"
    return bool(detect_quorum_queues(consumer.app, driver)[0])


def batcher_for(consumer: Any) -> PoolBatcher | None:
    """The consumer's batcher (one per consumer), or None: not prefork, or turned off."""
    found: PoolBatcher | None = getattr(consumer, "_modelworkers_batcher", None)
    if found is not None:
        return found
    settings = get_settings()
    pool = consumer.app.conf.worker_pool
    if not settings.pool_batching or settings.batch_max_size < 2 or pool != "prefork":
        return None
    processes = int(getattr(consumer.pool, "limit", 0) or consumer.app.conf.worker_concurrency)
    found = PoolBatcher(
        consumer,
        max_size=settings.batch_max_size,
        processes=processes,
        batching_models=batching_models(),
    )
    found.static_prefetch = quorum_queues(consumer)
    consumer._modelworkers_batcher = found
    if found.static_prefetch:
        log.info(
            "prefork batching: the prefetch is fixed on RabbitMQ quorum queues: a batch gathers "
            "at most the MODELWORKERS_PREFETCH_MULTIPLIER x concurrency messages this node holds"
        )
    log.info(
        "prefork batching: up to %d requests per pool job for %s",
        found.max_size,
        ", ".join(sorted(found.batching_models)) or "no model (none batches)",
    )
    return found


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The consumer's handler of a batching task's messages: Celery's default strategy, with
    the requests it would send to the pool handed to the batcher instead."""
    batcher = batcher_for(consumer)
    if batcher is None:
        return default_strategy(task, app, consumer, **kwargs)
    return default_strategy(task, app, _Intercepted(consumer, batcher.handle), **kwargs)
