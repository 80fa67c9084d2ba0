"""A typed Python client for web apps: send a task, get a typed result or a typed error.

::

    from workers.client import ModelClient

    with ModelClient() as client:              # REDIS_URL, TASK_QUEUE, KEY_PREFIX as the workers
        client.analyze("An absolute delight.")  # Sentiment(label='positive', score=0.98, ...)
        client.predict("sentiment", "Meh.")     # Prediction(model='sentiment', outputs={...})

:class:`ModelClient` blocks; :class:`AsyncModelClient` has the same methods as coroutines that
never block the event loop. What they do, in order:

* **Send.** A Celery app of their own, JSON only (signed with SIGNING_KEY when MESSAGE_SIGNING
  is on: ``workers.signing``), with ``task_default_queue`` set to TASK_QUEUE
  (a bare Celery client sends to ``celery``, a queue no worker consumes). A task for a model goes
  to that model's queue: from the ``queues`` mapping given, else from the live process snapshots
  in Redis (``ModelStatus.queue``, read again every ``routes_ttl`` seconds, and at most once a
  second while a model is in no snapshot), else TASK_QUEUE. Which model a task is for is
  ``workers.routing.model_of_task``, the rule the workers' own router uses.
* **Trace.** Where the process has set an OpenTelemetry tracer provider, each send is a PRODUCER
  span ``send/<task name>``, child of the caller's current span, whose context goes to the worker
  in the message's headers (``workers.tracing``): a web request, its send and the task's run are
  one trace. Otherwise nothing of OpenTelemetry is imported or called.
* **Wait.** The client app has no Celery result backend, so it leaves no result subscription
  behind. It reads ``celery-task-meta-<task id>``, the key the workers' result backend writes, and
  waits on that key's pub/sub channel (the backend publishes every write there), re-reading the
  key at least once a second. Every wait is bounded by ``timeout``.
* **Raise.** A failed task raises the ``shared.errors`` class named by its ``exc_type``, with the
  worker's message; any other ``exc_type`` raises :class:`~shared.errors.TaskFailed`. No result in
  time raises :class:`~shared.errors.ResultTimeout`; Redis unreachable raises
  :class:`~shared.errors.RedisUnavailable`.

Results are the pydantic models of ``shared.results``. The contract itself is docs/tasks.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import TypeAdapter
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from shared import errors
from shared.errors import ModelWorkersError, RedisUnavailable, ResultTimeout, TaskFailed
from shared.records import ProcessSnapshot
from shared.results import Clusters, Forecast, KMeansFit, Prediction, Sentiment
from shared.settings import Settings, get_settings
from shared.state import read_snapshots
from shared.urls import broker_connection_url, redact, redis_client, redis_connection_url
from workers import tracing
from workers.broker import celery_options as broker_options
from workers.routing import model_of_task
from workers.signing import setup as setup_signing

__all__ = ["AsyncModelClient", "ModelClient"]

DEFAULT_TIMEOUT = 30.0  # seconds a typed call waits for its result
ROUTES_TTL = 30.0  # seconds a read of the models' queues is used
MISSING_MODEL_REFRESH = 1.0  # a model in no snapshot: read them again at most this often
RECHECK_SECONDS = 1.0  # while waiting, read the result key at least this often
RESULT_KEY = "celery-task-meta-"  # Celery's Redis result backend: key and channel per task
READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

T = TypeVar("T")
log = logging.getLogger("modelworkers.client")

_SENTIMENTS = TypeAdapter(list[Sentiment])

# The errors a worker stores by name (exc_type): every ModelWorkersError of shared.errors.
ERRORS: dict[str, type[ModelWorkersError]] = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, ModelWorkersError)
}


# ---- what each typed method sends and how it reads the answer ------------------------------
@dataclass(frozen=True)
class Call(Generic[T]):
    """One task call: its name, JSON arguments, and the parser of its result."""

    task: str
    args: tuple[Any, ...]
    parse: Callable[[Any], T]
    kwargs: dict[str, Any] = field(default_factory=dict)


def _analyze(text: str) -> Call[Sentiment]:
    return Call("sentiment.analyze", (text,), Sentiment.model_validate)


def _analyze_batch(texts: Sequence[str]) -> Call[list[Sentiment]]:
    return Call("sentiment.analyze_batch", (list(texts),), _SENTIMENTS.validate_python)


def _forecast_prophet(series: Mapping[str, Any], horizon: int, frequency: str) -> Call[Forecast]:
    return Call(
        "forecast.prophet",
        (dict(series), horizon),
        Forecast.model_validate,
        {"frequency": frequency},
    )


def _forecast_arima(
    series: Mapping[str, Any], horizon: int, order: Sequence[int]
) -> Call[Forecast]:
    return Call(
        "forecast.arima", (dict(series), horizon), Forecast.model_validate, {"order": list(order)}
    )


def _forecast_predict(model: str, horizon: int) -> Call[Forecast]:
    return Call("forecast.predict", (model, horizon), Forecast.model_validate)


def _assign(rows: Sequence[Sequence[float]], model: str) -> Call[Clusters]:
    rows = [list(row) for row in rows]
    return Call("clustering.assign", (rows,), Clusters.model_validate, {"model": model})


def _fit(rows: Sequence[Sequence[float]], n_clusters: int) -> Call[KMeansFit]:
    rows = [list(row) for row in rows]
    return Call("clustering.fit", (rows, n_clusters), KMeansFit.model_validate)


def _predict(model: str, inputs: Any, version: str | None, key: str | None) -> Call[Prediction]:
    extra = {k: v for k, v in (("version", version), ("key", key)) if v is not None}
    return Call("models.predict", (model, inputs), Prediction.model_validate, extra)


# ---- results and errors --------------------------------------------------------------------
def decode_meta(raw: bytes | str | None) -> dict[str, Any]:
    """A stored ``celery-task-meta-<id>`` value as a dict; nothing (or garbage) is PENDING."""
    if not raw:
        return {"status": "PENDING"}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {"status": "PENDING"}
    return meta if isinstance(meta, dict) and "status" in meta else {"status": "PENDING"}


def error_from(task_id: str, meta: Mapping[str, Any]) -> ModelWorkersError:
    """The error of a FAILURE (or REVOKED) result: the shared.errors class named by its
    ``exc_type`` with the worker's message, else TaskFailed carrying both."""
    stored = meta.get("result")
    stored = stored if isinstance(stored, dict) else {}
    exc_type = str(stored.get("exc_type") or meta.get("status") or "Exception")
    args = stored.get("exc_message")
    if isinstance(args, list | tuple):
        message = str(args[0]) if args else ""
    else:
        message = "" if args is None else str(args)
    cls = ERRORS.get(exc_type)
    if cls is not None and cls not in (TaskFailed, ResultTimeout, RedisUnavailable):
        try:
            return cls(message)  # every class takes the message alone (rebuilt form)
        except Exception:  # a class whose rebuilt form changed: still report it
            log.debug("cannot rebuild %s(%r)", exc_type, message, exc_info=True)
    return TaskFailed(message, exc_type=exc_type, task_id=task_id)


def outcome(task_id: str, meta: Mapping[str, Any]) -> Any:
    """The result of a ready task, or its error raised."""
    if meta.get("status") == "SUCCESS":
        return meta.get("result")
    raise error_from(task_id, meta)


def routes_from(snapshots: Iterable[ProcessSnapshot]) -> dict[str, str]:
    """Model -> queue ("" = the default queue) as the processes report it. When processes
    disagree (a change being rolled out), the queue most READY copies report wins."""
    votes: dict[str, Counter[str]] = {}
    for snap in snapshots:
        for name, status in snap.models.items():
            votes.setdefault(name, Counter())[status.queue] += 2 if status.status == "READY" else 1
    return {name: counts.most_common(1)[0][0] for name, counts in votes.items()}


def _timeout_of(timeout: float | None, default: float) -> float:
    return max(0.0, default if timeout is None else float(timeout))


def _redis_retry() -> dict[str, Any]:
    """Few, short retries: a web request fails in about a second when Redis is down."""
    return {"retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3)}


def _celery_app(settings: Settings, url: str, queue: str) -> Celery:
    """A send-only Celery app on the broker at ``url`` (Redis or RabbitMQ, declaring its queues
    as the workers do: workers.broker): JSON, the default queue preset, bounded connection
    attempts, and no result backend (the client reads results from Redis itself)."""
    app = Celery(
        "modelworkers-client", broker=url, set_as_current=False, amqp="workers.broker:BrokerAMQP"
    )
    app.conf.update(broker_options(settings, url))
    app.conf.update(
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Fail a call in seconds when Redis is down, instead of retrying for minutes.
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=False,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
    )
    if url.startswith("sentinel://"):
        app.conf.broker_transport_options = {"master_name": settings.redis_sentinel_master}
    if url.startswith("rediss://"):
        import ssl

        reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
        app.conf.broker_use_ssl = {
            "ssl_cert_reqs": reqs[settings.redis_tls_cert_reqs],
            "ssl_ca_certs": settings.redis_tls_ca_certs,
        }
    # MESSAGE_SIGNING: tasks signed with SIGNING_KEY, as the workers then require.
    setup_signing(app, settings)
    return app


# ---- the blocking client -------------------------------------------------------------------
class ModelClient:
    """Blocking client. Thread-safe: one per process is enough (a web app's worker threads can
    share it).

    ``ModelClient()`` reads the settings the workers read (REDIS_URL + REDIS_USERNAME and
    REDIS_PASSWORD, BROKER_URL, TLS, TASK_QUEUE, KEY_PREFIX, MESSAGE_SIGNING); ``redis_url``
    (user and password inside it), ``broker_url`` (= the workers' BROKER_URL, when tasks go to
    another broker than Redis, e.g. RabbitMQ), ``queue`` (= the workers'
    TASK_QUEUE) and ``key_prefix`` (= their KEY_PREFIX) override them. ``queues`` maps a model
    to the queue its tasks must go to, ahead of what the snapshots say. ``timeout`` is the
    default wait of the typed methods, in seconds.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        queue: str | None = None,
        key_prefix: str | None = None,
        queues: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        routes_ttl: float = ROUTES_TTL,
        settings: Settings | None = None,
    ) -> None:
        base = settings or get_settings()
        if redis_url is not None:
            base = base.model_copy(
                update={"redis_url": redis_url, "redis_password": None, "redis_username": None}
            )
        if broker_url is not None:
            base = base.model_copy(update={"broker_url": broker_url or None})
        self.settings = base
        self.url = redis_connection_url(base)
        self.broker_url = broker_connection_url(base)
        self.queue = queue or base.task_queue
        self.key_prefix = key_prefix or base.key_prefix
        self.queues = dict(queues or {})
        self.timeout = timeout
        self.routes_ttl = routes_ttl
        self.redis: Any = redis_client(base, **_redis_retry())  # connects on first use
        self.app = _celery_app(base, self.broker_url, self.queue)
        self._routes: dict[str, str] = {}
        self._routes_at = -float("inf")
        self._lock = threading.Lock()
        self._producers_ready = False

    def __repr__(self) -> str:
        broker = f", broker_url={redact(self.broker_url)!r}" if self.broker_url != self.url else ""
        return (
            f"{type(self).__name__}({redact(self.url)!r}{broker}, queue={self.queue!r}, "
            f"key_prefix={self.key_prefix!r})"
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the broker and Redis connections."""
        self.app.close()
        self.redis.close()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routing -----------------------------------------------------------------------------
    def snapshots(self) -> list[ProcessSnapshot]:
        """Every live serving process's snapshot (``shared.state.read_snapshots``)."""
        try:
            return read_snapshots(self.redis, self.key_prefix)
        except RedisError as exc:
            raise RedisUnavailable(f"cannot reach Redis: {redact(str(exc))}") from exc

    def routes(self) -> dict[str, str]:
        """Model -> the queue its tasks are sent to now: the ``queues`` given, then every model a
        live process reports (its queue, or this client's default queue)."""
        table = {name: queue or self.queue for name, queue in self._current_routes(None).items()}
        return {**table, **self.queues}

    def queue_for(self, model: str | None) -> str:
        """The queue a task for ``model`` goes to (None, a task of no model: the default)."""
        if model is None:
            return self.queue
        if model in self.queues:
            return self.queues[model]
        return self._current_routes(model).get(model) or self.queue

    def route(self, task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        """The queue of a task call: its model's queue (``workers.routing.model_of_task``)."""
        return self.queue_for(model_of_task(task_name, args, kwargs))

    def _current_routes(self, model: str | None) -> dict[str, str]:
        with self._lock:
            age = time.monotonic() - self._routes_at
            missing = model is not None and model not in self._routes
            if age > self.routes_ttl or (missing and age > MISSING_MODEL_REFRESH):
                try:
                    self._routes = routes_from(read_snapshots(self.redis, self.key_prefix))
                except RedisError as exc:  # sending will say so; route with what we knew
                    log.debug("cannot read the snapshots: %s", redact(str(exc)))
                self._routes_at = time.monotonic()
            return self._routes

    # -- sending and waiting ------------------------------------------------------------------
    def send(self, task_name: str, /, *args: Any, **kwargs: Any) -> str:
        """Enqueue ``task_name`` with JSON arguments on its queue; the task id."""
        queue = self.route(task_name, args, kwargs)
        task_id = str(uuid.uuid4())
        if not self._producers_ready:  # build Celery's producer pool once, not in two threads
            with self._lock:
                _ = self.app.producer_pool  # lazy: connects on the first publish
                self._producers_ready = True
        tracer = tracing.client_tracer()
        if tracer is None:
            self._publish(task_name, args, kwargs, task_id, queue, None)
        else:
            with tracing.send_span(tracer, task_name, task_id, queue) as headers:
                self._publish(task_name, args, kwargs, task_id, queue, headers)
        return task_id

    def _publish(
        self,
        task_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_id: str,
        queue: str,
        headers: dict[str, str] | None,
    ) -> None:
        extra = {"headers": headers} if headers else {}
        try:
            self.app.send_task(
                task_name, args=list(args), kwargs=kwargs, task_id=task_id, queue=queue, **extra
            )
        except (OperationalError, RedisError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise RedisUnavailable(f"cannot enqueue {task_name}: {redact(str(cause))}") from exc

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` s (default: the client's) for a task's JSON result; raise its
        error if it failed, ResultTimeout if it is not done by then. ``timeout=0`` looks once:
        a way to poll (``ResultTimeout.state`` says PENDING or STARTED)."""
        return outcome(task_id, self.wait(task_id, _timeout_of(timeout, self.timeout)))

    def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The task's stored result record once it is ready (SUCCESS, FAILURE, REVOKED)."""
        key = RESULT_KEY + task_id
        deadline = time.monotonic() + timeout
        try:
            meta = decode_meta(self.redis.get(key))
            if meta["status"] in READY_STATES:
                return meta
            if timeout > 0:
                with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    pubsub.subscribe(key)
                    meta = decode_meta(self.redis.get(key))  # written before we subscribed?
                    while meta["status"] not in READY_STATES:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        message = pubsub.get_message(timeout=min(remaining, RECHECK_SECONDS))
                        if message is not None and message.get("type") == "message":
                            meta = decode_meta(message["data"])
                        else:
                            meta = decode_meta(self.redis.get(key))
        except RedisError as exc:
            raise RedisUnavailable(
                f"cannot read the result of task {task_id}: {redact(str(exc))}"
            ) from exc
        if meta["status"] in READY_STATES:
            return meta
        raise ResultTimeout(task_id, timeout, str(meta["status"]))

    def call(self, call: Call[T], timeout: float | None = None) -> T:
        """Send a prepared call and parse its result."""
        task_id = self.send(call.task, *call.args, **call.kwargs)
        return call.parse(self.result(task_id, timeout))

    # -- the built-in tasks, typed -------------------------------------------------------------
    def analyze(self, text: str, *, timeout: float | None = None) -> Sentiment:
        """``sentiment.analyze``: the sentiment of one text."""
        return self.call(_analyze(text), timeout)

    def analyze_batch(
        self, texts: Sequence[str], *, timeout: float | None = None
    ) -> list[Sentiment]:
        """``sentiment.analyze_batch``: one Sentiment per text, in order."""
        return self.call(_analyze_batch(texts), timeout)

    def forecast_prophet(
        self,
        series: Mapping[str, Any],
        horizon: int,
        frequency: str = "D",
        *,
        timeout: float | None = None,
    ) -> Forecast:
        """``forecast.prophet``: fit Prophet on ``{"ds": [...], "y": [...]}`` and forecast."""
        return self.call(_forecast_prophet(series, horizon, frequency), timeout)

    def forecast_arima(
        self,
        series: Mapping[str, Any],
        horizon: int,
        order: Sequence[int] = (1, 1, 1),
        *,
        timeout: float | None = None,
    ) -> Forecast:
        """``forecast.arima``: fit ARIMA(p, d, q) on ``{"y": [...]}`` (``ds`` optional)."""
        return self.call(_forecast_arima(series, horizon, order), timeout)

    def forecast_predict(
        self, model: str, horizon: int, *, timeout: float | None = None
    ) -> Forecast:
        """``forecast.predict``: forecast with a registered, pre-fitted forecaster."""
        return self.call(_forecast_predict(model, horizon), timeout)

    def assign(
        self,
        rows: Sequence[Sequence[float]],
        model: str = "customer_segments",
        *,
        timeout: float | None = None,
    ) -> Clusters:
        """``clustering.assign``: a cluster label per row, from a registered pipeline."""
        return self.call(_assign(rows, model), timeout)

    def fit(
        self, rows: Sequence[Sequence[float]], n_clusters: int, *, timeout: float | None = None
    ) -> KMeansFit:
        """``clustering.fit``: KMeans fitted on the rows sent."""
        return self.call(_fit(rows, n_clusters), timeout)

    def predict(
        self,
        model: str,
        inputs: Any,
        version: str | None = None,
        *,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """``models.predict``: any model of the repository; ``version`` pins the version, and
        ``key`` (e.g. a user id) always gets the same version while the model is split."""
        return self.call(_predict(model, inputs, version, key), timeout)


# ---- the asyncio client --------------------------------------------------------------------
class AsyncModelClient:
    """The same client for asyncio: the same constructor, the same methods as coroutines.

    Publishing (a blocking kombu call) runs in a thread (``asyncio.to_thread``); the wait for a
    result uses ``redis.asyncio`` (the result key and its pub/sub channel), so the event loop is
    never blocked. Meant to be used from one event loop (its asyncio Redis connections belong to
    the loop that opened them; another loop gets connections of its own).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        broker_url: str | None = None,
        queue: str | None = None,
        key_prefix: str | None = None,
        queues: Mapping[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        routes_ttl: float = ROUTES_TTL,
        settings: Settings | None = None,
    ) -> None:
        self.sync = ModelClient(
            redis_url,
            broker_url=broker_url,
            queue=queue,
            key_prefix=key_prefix,
            queues=queues,
            timeout=timeout,
            routes_ttl=routes_ttl,
            settings=settings,
        )
        self._aredis: Any = None
        self._aredis_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return repr(self.sync).replace("ModelClient", type(self).__name__, 1)

    @property
    def queue(self) -> str:
        return self.sync.queue

    @property
    def key_prefix(self) -> str:
        return self.sync.key_prefix

    @property
    def timeout(self) -> float:
        return self.sync.timeout

    def _redis(self) -> Any:
        """This loop's asyncio Redis client (opened lazily)."""
        loop = asyncio.get_running_loop()
        if self._aredis is None or self._aredis_loop is not loop:
            options: dict[str, Any] = {
                "socket_timeout": 5,
                "socket_connect_timeout": 5,
                "health_check_interval": 30,
                "retry": AsyncRetry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 3),
            }
            if self.sync.url.startswith("rediss://"):
                options["ssl_cert_reqs"] = self.sync.settings.redis_tls_cert_reqs
                if self.sync.settings.redis_tls_ca_certs:
                    options["ssl_ca_certs"] = self.sync.settings.redis_tls_ca_certs
            self._aredis = aioredis.Redis.from_url(self.sync.url, **options)
            self._aredis_loop = loop
        return self._aredis

    # -- lifecycle ---------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Release the connections (the asyncio ones of this loop, the broker's, Redis')."""
        if self._aredis is not None and self._aredis_loop is asyncio.get_running_loop():
            await self._aredis.aclose()
        self._aredis = self._aredis_loop = None
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncModelClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- routing, sending and waiting ------------------------------------------------------------
    async def snapshots(self) -> list[ProcessSnapshot]:
        """Every live serving process's snapshot (read in a thread)."""
        return await asyncio.to_thread(self.sync.snapshots)

    async def routes(self) -> dict[str, str]:
        """Model -> queue, as :meth:`ModelClient.routes` (read in a thread)."""
        return await asyncio.to_thread(self.sync.routes)

    async def send(self, task_name: str, /, *args: Any, **kwargs: Any) -> str:
        """Enqueue ``task_name`` on its queue (routing and publishing in a thread); the id."""
        return await asyncio.to_thread(self.sync.send, task_name, *args, **kwargs)

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """As :meth:`ModelClient.result`, waiting with redis.asyncio."""
        return outcome(task_id, await self.wait(task_id, _timeout_of(timeout, self.timeout)))

    async def wait(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The task's stored result record once it is ready, waiting at most ``timeout`` s."""
        key = RESULT_KEY + task_id
        client = self._redis()
        meta: dict[str, Any] = {"status": "PENDING"}
        try:
            meta = decode_meta(await client.get(key))
            if meta["status"] in READY_STATES or timeout <= 0:
                return self._ready_or_timeout(task_id, timeout, meta)
            async with asyncio.timeout(timeout):
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(key)
                    meta = decode_meta(await client.get(key))  # written before we subscribed?
                    while meta["status"] not in READY_STATES:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=RECHECK_SECONDS
                        )
                        if message is not None and message.get("type") == "message":
                            meta = decode_meta(message["data"])
                        else:
                            meta = decode_meta(await client.get(key))
                finally:
                    await asyncio.shield(pubsub.aclose())
        except TimeoutError:  # asyncio.timeout's: the wait ran out
            pass
        except RedisError as exc:
            raise RedisUnavailable(
                f"cannot read the result of task {task_id}: {redact(str(exc))}"
            ) from exc
        return self._ready_or_timeout(task_id, timeout, meta)

    @staticmethod
    def _ready_or_timeout(task_id: str, timeout: float, meta: dict[str, Any]) -> dict[str, Any]:
        if meta["status"] in READY_STATES:
            return meta
        raise ResultTimeout(task_id, timeout, str(meta["status"]))

    async def call(self, call: Call[T], timeout: float | None = None) -> T:
        """Send a prepared call and parse its result."""
        task_id = await self.send(call.task, *call.args, **call.kwargs)
        return call.parse(await self.result(task_id, timeout))

    # -- the built-in tasks, typed -------------------------------------------------------------
    async def analyze(self, text: str, *, timeout: float | None = None) -> Sentiment:
        """``sentiment.analyze``: the sentiment of one text."""
        return await self.call(_analyze(text), timeout)

    async def analyze_batch(
        self, texts: Sequence[str], *, timeout: float | None = None
    ) -> list[Sentiment]:
        """``sentiment.analyze_batch``: one Sentiment per text, in order."""
        return await self.call(_analyze_batch(texts), timeout)

    async def forecast_prophet(
        self,
        series: Mapping[str, Any],
        horizon: int,
        frequency: str = "D",
        *,
        timeout: float | None = None,
    ) -> Forecast:
        """``forecast.prophet``: fit Prophet on ``{"ds": [...], "y": [...]}`` and forecast."""
        return await self.call(_forecast_prophet(series, horizon, frequency), timeout)

    async def forecast_arima(
        self,
        series: Mapping[str, Any],
        horizon: int,
        order: Sequence[int] = (1, 1, 1),
        *,
        timeout: float | None = None,
    ) -> Forecast:
        """``forecast.arima``: fit ARIMA(p, d, q) on ``{"y": [...]}`` (``ds`` optional)."""
        return await self.call(_forecast_arima(series, horizon, order), timeout)

    async def forecast_predict(
        self, model: str, horizon: int, *, timeout: float | None = None
    ) -> Forecast:
        """``forecast.predict``: forecast with a registered, pre-fitted forecaster."""
        return await self.call(_forecast_predict(model, horizon), timeout)

    async def assign(
        self,
        rows: Sequence[Sequence[float]],
        model: str = "customer_segments",
        *,
        timeout: float | None = None,
    ) -> Clusters:
        """``clustering.assign``: a cluster label per row, from a registered pipeline."""
        return await self.call(_assign(rows, model), timeout)

    async def fit(
        self, rows: Sequence[Sequence[float]], n_clusters: int, *, timeout: float | None = None
    ) -> KMeansFit:
        """``clustering.fit``: KMeans fitted on the rows sent."""
        return await self.call(_fit(rows, n_clusters), timeout)

    async def predict(
        self,
        model: str,
        inputs: Any,
        version: str | None = None,
        *,
        key: str | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """``models.predict``: any model of the repository; ``version`` pins the version, and
        ``key`` (e.g. a user id) always gets the same version while the model is split."""
        return await self.call(_predict(model, inputs, version, key), timeout)
