"""Intake: what a worker's main process does with a message before any task code sees it.

One message must never stop a node. A message is checked at each step that it could break:

1. **The envelope** (Redis transport). The worker takes a JSON envelope off the queue list (and
   registers it as unacknowledged in the same atomic step, ``workers.receive``) and decodes
   it in the worker's event loop; an envelope that is not JSON, or lacks the fields kombu reads,
   used to raise out of the loop and stop the node. :class:`GuardedRedisTransport` decodes it
   under a guard and checks its shape (types, encoding, no compression, nesting) before kombu
   builds a message from it.
2. **The task message** (every transport). :class:`GuardedConsumer` checks the headers and the
   body: sizes, the nesting depth of the raw JSON (read from the bytes, before anything
   recursive touches it: a deep list is pickled recursively when handed to a prefork pool
   process, and the RecursionError stopped the node), the argument counts and the header types
   Celery reads. Then Celery dispatches it; if dispatching raises anyway, only that task ends.
   With MESSAGE_SIGNING on, the body must be signed (``workers.signing``): its signed size is
   checked, then its signature, and the size and depth checks run on the JSON that was signed,
   all before anything decodes it.
3. **The pool process dying.** :class:`GuardedRequest` counts, in Redis, the deliveries of a
   task whose pool process died under it (``WorkerLostError``). At ``POISON_LOST_DELIVERIES`` it
   fails the task as :class:`~shared.errors.PoisonTask` instead of requeueing it once more.

A refused message is acknowledged (never restored for the next node to take), a FAILURE with an
:class:`~shared.errors.InvalidMessage` naming the problem is stored when its task id is known,
one error line is logged, and ``modelworkers_messages_refused_total{reason}`` counts it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu import transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import SentinelChannel, SentinelTransport
from kombu.transport.redis import Transport as RedisTransport
from vine import promise

from shared import metrics
from shared.errors import InvalidMessage, PoisonTask
from shared.settings import Settings, get_settings
from shared.urls import redact, redis_client
from workers.receive import AtomicReceive
from workers.signing import SIGNATURE_ROOM, SIGNED_CONTENT_TYPE, BadSignature, Opened, Verifier

log = logging.getLogger("modelworkers.intake")

DEFAULT_STRATEGY = "celery.worker.strategy:default"
DEFAULT_REQUEST = "celery.worker.request:Request"
LOST_TTL = 86_400  # a lost-delivery count outlives any redelivery (visibility timeout)
MAX_HEADER_BYTES = 64 * 1024  # headers + properties of a task message, as JSON text roughly
TASK_ID = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as Celery's uuids are
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
for _b in b"[{":
    _STEP[_b] = 1
for _b in b"]}":
    _STEP[_b] = -1
_STR_HEADERS = ("lang", "root_id", "parent_id", "group", "origin", "shadow", "eta", "expires")
_REPR_HEADERS = ("argsrepr", "kwargsrepr")


@dataclass(frozen=True)
class MessageLimits:
    """Limits on a message's shape, from MAX_MESSAGE_BYTES / _DEPTH / _ARGS."""

    max_bytes: int
    max_depth: int
    max_args: int
    signed: bool = False  # MESSAGE_SIGNING: task bodies come signed (workers.signing)

    @classmethod
    def from_settings(cls, settings: Settings) -> MessageLimits:
        return cls(
            max_bytes=settings.max_message_bytes,
            max_depth=settings.max_message_depth,
            max_args=settings.max_message_args,
            signed=settings.message_signing,
        )

    @property
    def body_bytes(self) -> int:
        """Largest task body accepted as it arrives: MAX_MESSAGE_BYTES of JSON, or, signed,
        that JSON base64-encoded behind its signer and signature."""
        if not self.signed:
            return self.max_bytes
        return (self.max_bytes + SIGNATURE_ROOM) * 4 // 3 + 4


class Refused(Exception):
    """A message broke a rule: ``reason`` is the metric label, the message says what and why."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(problem)
        self.reason = reason


# ---- shape checks (no recursion, bounded work) -------------------------------------------
def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays and objects in JSON text, read from the bytes: string contents
    are blanked first, so brackets inside strings do not count. Never recursive."""
    brackets = _JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def object_shape(value: Any, max_depth: int) -> tuple[int, int]:
    """(depth, rough size in bytes) of decoded JSON-like data; stops once deeper than
    ``max_depth``. Iterative: a deep structure cannot exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    deepest = size = 0
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            deepest = max(deepest, depth)
            if depth > max_depth:
                return deepest, size
            if isinstance(item, dict):
                for key, inner in item.items():
                    size += len(key) if isinstance(key, str | bytes) else 8
                    stack.append((inner, depth))
            else:
                stack.extend((inner, depth) for inner in item)
        elif isinstance(item, str | bytes):
            size += len(item)
        else:
            size += 8
    return deepest, size


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _check_meta(what: str, value: Any, limits: MessageLimits) -> None:
    depth, size = object_shape(value, limits.max_depth)
    if depth > limits.max_depth:
        raise Refused(
            "too_deep",
            f"{what} nested deeper than {limits.max_depth} levels (MODELWORKERS_MAX_MESSAGE_DEPTH)",
        )
    if size > MAX_HEADER_BYTES:
        raise Refused(
            "too_large", f"{what} of about {size:,} bytes, more than {MAX_HEADER_BYTES:,}"
        )


def check_envelope(payload: Any, limits: MessageLimits) -> None:
    """The Redis transport's JSON envelope: the fields kombu reads, with the types it expects."""
    if not isinstance(payload, dict):
        raise Refused("bad_envelope", f"the envelope is {_type_name(payload)}, not an object")
    props = payload.get("properties")
    if not isinstance(props, dict):
        raise Refused("bad_envelope", "the envelope has no 'properties' object")
    if not isinstance(props.get("delivery_tag"), str):
        raise Refused("bad_envelope", "properties.delivery_tag must be a string")
    if props.get("delivery_info") is not None and not isinstance(props["delivery_info"], dict):
        raise Refused("bad_envelope", "properties.delivery_info must be an object")
    if props.get("body_encoding") not in (None, "base64", "utf-8"):
        raise Refused("bad_envelope", "properties.body_encoding must be base64 or utf-8")
    for key in ("body", "content-type", "content-encoding"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise Refused("bad_envelope", f"'{key}' must be a string")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Refused("bad_envelope", "'headers' must be an object")
    if headers and headers.get("compression"):
        raise Refused("compressed", "compressed message bodies are not accepted")
    body = payload.get("body") or ""
    if len(body) > limits.body_bytes * 4 // 3 + 4:  # base64 of the largest accepted body
        raise Refused(
            "too_large",
            f"a body of about {len(body) * 3 // 4:,} bytes is more than the limit of "
            f"{limits.body_bytes:,} (MODELWORKERS_MAX_MESSAGE_BYTES"
            + (", signed)" if limits.signed else ")"),
        )
    _check_meta("the envelope's headers", headers, limits)
    _check_meta("the envelope's properties", props, limits)


def task_identity(headers: Any) -> tuple[str, str | None]:
    """(task name or "?", task id or None): what can be safely named and stored for a message."""
    if not isinstance(headers, dict):
        return "?", None
    name, task_id = headers.get("task"), headers.get("id")
    shown = name[:200] if isinstance(name, str) and name else "?"
    return shown, task_id if isinstance(task_id, str) and TASK_ID.match(task_id) else None


def check_task_message(
    message: Any, limits: MessageLimits, verify: Callable[[bytes], Opened] | None = None
) -> None:
    """Everything Celery will read of a task message, checked before it reads it. ``verify``
    (MESSAGE_SIGNING) opens a signed body: the size and depth checks then run on the JSON that
    was signed."""
    headers = message.headers
    if not isinstance(headers, dict):
        raise Refused("bad_headers", "the headers are not an object")
    name = headers.get("task")
    if name is None:
        raise Refused("bad_headers", "no 'task' header: only task protocol 2 is accepted")
    if not isinstance(name, str) or not 0 < len(name) <= 255:
        raise Refused("bad_headers", "header 'task' must be a task name of 1-255 characters")
    if task_identity(headers)[1] is None:
        raise Refused("bad_headers", "header 'id' must be 1-255 printable ASCII characters")
    _check_meta("the headers", headers, limits)
    _check_meta("the properties", message.properties, limits)
    if not isinstance(message.delivery_info, dict):
        raise Refused("bad_headers", "delivery_info must be an object")
    for key in _STR_HEADERS:
        if headers.get(key) is not None and not isinstance(headers[key], str):
            raise Refused("bad_headers", f"header '{key}' must be a string or null")
    for key in _REPR_HEADERS:
        if headers.get(key) is not None and not isinstance(headers[key], str):
            raise Refused("bad_headers", f"header '{key}' must be a string or null")
    retries = headers.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        raise Refused("bad_headers", "header 'retries' must be a non-negative integer")
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        isinstance(timelimit, list | tuple)
        and len(timelimit) == 2
        and all(
            v is None or (type(v) in (int, float) and math.isfinite(v) and v > 0) for v in timelimit
        )
    ):
        raise Refused("bad_headers", "header 'timelimit' must be [soft, hard] seconds or null")
    if headers.get("compression"):
        raise Refused("compressed", "compressed message bodies are not accepted")
    if limits.signed:
        if message.content_type != SIGNED_CONTENT_TYPE:
            raise Refused(
                "unsigned",
                f"the message is not signed (content type {str(message.content_type)[:60]!r}): "
                "MODELWORKERS_MESSAGE_SIGNING is on, and only messages signed with Celery's auth "
                f"serializer ({SIGNED_CONTENT_TYPE}) are accepted",
            )
    elif message.content_type != "application/json":
        raise Refused(
            "content_type",
            f"content type {str(message.content_type)[:60]!r} is not accepted: "
            "task messages are JSON (application/json)",
        )
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogatepass")
    if not isinstance(body, bytes | bytearray | memoryview):
        raise Refused("bad_body", "the message has no body")
    if limits.signed:
        if len(body) > limits.body_bytes:
            raise Refused(
                "too_large",
                f"a signed body of {len(body):,} bytes is more than the limit of "
                f"{limits.body_bytes:,} (MODELWORKERS_MAX_MESSAGE_BYTES of JSON, signed)",
            )
        if verify is None:
            raise Refused("bad_signature", "bad signature: no certificates to verify against")
        try:
            body = verify(bytes(body)).body  # the JSON that was signed
        except BadSignature as exc:
            raise Refused("bad_signature", f"bad signature: {exc}") from None
    if len(body) > limits.max_bytes:
        raise Refused(
            "too_large",
            f"a body of {len(body):,} bytes is more than the limit of {limits.max_bytes:,} "
            "(MODELWORKERS_MAX_MESSAGE_BYTES)",
        )
    body = bytes(body)
    # Each opening bracket adds at most one level: count them (fast) before measuring exactly.
    depth = body.count(b"[") + body.count(b"{")
    if depth - 1 > limits.max_depth:
        depth = json_depth(body)
    if depth - 1 > limits.max_depth:  # the body is [args, kwargs, embed]: one level of its own
        raise Refused(
            "too_deep",
            f"args nested {depth - 1} levels deep, deeper than the limit of {limits.max_depth} "
            "(MODELWORKERS_MAX_MESSAGE_DEPTH)",
        )
    try:
        # kombu keeps it: Celery's dispatch does not decode again (signed: Celery's serializer
        # verifies the signature once more, then decodes the JSON checked above)
        payload = message.decode()
    except Exception as exc:
        raise Refused("not_json", f"the body is not valid JSON: {str(exc)[:200]}") from None
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        raise Refused("bad_body", "the body must be [args, kwargs, embed] (task protocol 2)")
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        raise Refused("bad_body", f"args must be an array, not {_type_name(args)}")
    if not isinstance(kwargs, dict):
        raise Refused("bad_body", f"kwargs must be an object, not {_type_name(kwargs)}")
    if embed is not None and not isinstance(embed, dict):
        raise Refused("bad_body", f"the options must be an object, not {_type_name(embed)}")
    for what, count in (("positional", len(args)), ("keyword", len(kwargs))):
        if count > limits.max_args:
            raise Refused(
                "too_many_args",
                f"{count} {what} arguments, more than the limit of {limits.max_args} "
                "(MODELWORKERS_MAX_MESSAGE_ARGS)",
            )
    for key in ("callbacks", "errbacks", "chain"):
        if embed and embed.get(key) is not None and not isinstance(embed[key], list):
            raise Refused("bad_body", f"options.{key} must be an array or null")
    if embed and embed.get("chord") is not None and not isinstance(embed["chord"], dict):
        raise Refused("bad_body", "options.chord must be an object or null")


# ---- what a refusal does ------------------------------------------------------------------
class Intake:
    """This node's refusal bookkeeping: log, metric, stored FAILURE; and the lost-delivery
    counts of poison tasks, kept in Redis so that they survive node restarts."""

    def __init__(
        self,
        settings: Settings,
        *,
        store_failure: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.limits = MessageLimits.from_settings(settings)
        self.verifier = Verifier.from_settings(settings)
        self.poison_after = settings.poison_lost_deliveries
        self.prefix = settings.key_prefix
        self._settings = settings
        self._client: Any = None
        self.store_failure = store_failure

    def refuse(self, exc: Refused, headers: Any, where: str) -> None:
        name, task_id = task_identity(headers)
        log.error(
            "refused %s[%s] %s: InvalidMessage: %s", name, task_id or "no usable id", where, exc
        )
        metrics.record_refused(exc.reason)
        if task_id and self.store_failure is not None:
            try:
                self.store_failure(task_id, InvalidMessage(str(exc)))
            except Exception as store_exc:
                log.error("could not store the FAILURE of %s: %s", task_id, redact(str(store_exc)))

    def lost_delivery(self, task_id: str) -> int | None:
        """Count one delivery of ``task_id`` that killed its pool process; None if Redis failed
        (the task is then requeued as Celery would)."""
        try:
            if self._client is None:
                self._client = redis_client(self._settings)
            key = f"{self.prefix}:lost:{task_id}"
            pipe = self._client.pipeline()
            pipe.incr(key)
            pipe.expire(key, LOST_TTL)
            count, _ = pipe.execute()
            return int(count)
        except Exception as exc:
            log.warning("could not count the lost delivery of %s: %s", task_id, redact(str(exc)))
            return None


_intake: Intake | None = None  # this main process's, set by GuardedConsumer (one per node)


def current_intake() -> Intake:
    global _intake
    if _intake is None:
        _intake = Intake(get_settings())
    return _intake


# ---- the transport: envelopes ------------------------------------------------------------
_DECODE_ERRORS = (ValueError, TypeError, RecursionError, MemoryError)


class _GuardedChannel(AtomicReceive):
    """What the product adds to kombu's Redis channels (plain and Sentinel): each message taken
    and registered as unacknowledged in one atomic step (:class:`~workers.receive.AtomicReceive`);
    an envelope that does not decode dropped instead of raising out of the event loop; the
    acknowledgements and unacked-index writes sharing one client object over the channel's
    connection pool (kombu builds a new one for each, twice per task)."""

    _shared_client: Any = None
    pool: Any
    connection: Any

    if TYPE_CHECKING:  # kombu's, on the Channel this mixes into

        def _create_client(self, asynchronous: bool = False) -> Any: ...

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except _DECODE_ERRORS as exc:
            self.connection.refuse_envelope(Refused("bad_envelope", f"not JSON: {exc}"), None)
            return True

    def _get(self, queue: Any, timeout: Any = None) -> Any:
        try:
            return super()._get(queue)  # type: ignore[misc]
        except _DECODE_ERRORS as exc:
            from queue import Empty

            self.connection.refuse_envelope(Refused("bad_envelope", f"not JSON: {exc}"), None)
            raise Empty() from None

    def _receive_one(self, c: Any) -> Any:
        try:
            return super()._receive_one(c)  # type: ignore[misc]
        except _DECODE_ERRORS as exc:  # a broadcast (remote control) that does not decode
            log.error("dropped a broadcast message that does not decode: %s", exc)
            metrics.record_refused("bad_envelope")
            return False


class GuardedRedisChannel(_GuardedChannel, RedisChannel):
    """kombu's Redis channel with :class:`_GuardedChannel`'s additions."""


class GuardedSentinelChannel(_GuardedChannel, SentinelChannel):
    """kombu's Redis Sentinel channel with :class:`_GuardedChannel`'s additions."""


class _GuardedTransport:
    """Envelopes checked before kombu reads them (see the module docstring)."""

    connection_errors: Any

    def refuse_envelope(self, exc: Refused, payload: Any) -> None:
        headers = payload.get("headers") if isinstance(payload, dict) else None
        current_intake().refuse(exc, headers, "at the transport")

    def _deliver(self, message: Any, queue: Any) -> None:
        try:
            check_envelope(message, current_intake().limits)
        except Refused as exc:
            self.refuse_envelope(exc, message)
            return
        try:
            super()._deliver(message, queue)  # type: ignore[misc]
        except self.connection_errors:
            raise
        except Exception as exc:  # the consumers guard themselves: this is a last resort
            log.exception("a message on %s could not be delivered; dropped", queue)
            self.refuse_envelope(Refused("dispatch_error", f"{type(exc).__name__}: {exc}"), message)


class GuardedRedisTransport(_GuardedTransport, RedisTransport):
    """kombu's Redis transport with the product's channel and envelope checks. ``redis://`` and
    ``rediss://`` broker URLs use it in every process that imports ``workers.app``
    (``register_transport``)."""

    Channel = GuardedRedisChannel


class GuardedSentinelTransport(_GuardedTransport, SentinelTransport):
    """The same for ``sentinel://`` broker URLs (kombu's Sentinel transport underneath)."""

    Channel = GuardedSentinelChannel


GUARDED_TRANSPORTS = {
    "redis": "GuardedRedisTransport",
    "rediss": "GuardedRedisTransport",
    "sentinel": "GuardedSentinelTransport",
}


def register_transport() -> None:
    """Serve ``redis://`` and ``rediss://`` broker URLs with :class:`GuardedRedisTransport` and
    ``sentinel://`` ones with :class:`GuardedSentinelTransport`."""
    # kombu caches each scheme's class on first use: a process that opened a Redis connection
    # before this call would go on with kombu's own transport
    cache = getattr(kombu_transport, "_transport_cache", {})
    for scheme, name in GUARDED_TRANSPORTS.items():
        TRANSPORT_ALIASES[scheme] = f"workers.intake:{name}"
        cache.pop(scheme, None)


# ---- the consumer: task messages ---------------------------------------------------------
class GuardedConsumer(Consumer):
    """Celery's consumer, with every task message checked before Celery dispatches it and any
    error while dispatching ending that one task (``worker_consumer`` in celeryconfig)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        global _intake
        _intake = Intake(get_settings(), store_failure=self._store_failure)
        self.intake = _intake

    def _store_failure(self, task_id: str, exc: BaseException) -> None:
        self.app.backend.mark_as_failure(task_id, exc, request=None, call_errbacks=False)

    def update_strategies(self) -> None:
        # Tasks that keep Celery's Request class count the deliveries that killed their pool
        # process (poison tasks); done here, where the worker builds its dispatch table.
        for task in self.app.tasks.values():
            if task.Request == DEFAULT_REQUEST:
                task.Request = "workers.intake:GuardedRequest"
            # concurrent requests of these tasks share pool jobs (prefork; workers/poolbatch.py)
            if getattr(task, "pool_batches", False) and task.Strategy == DEFAULT_STRATEGY:
                task.Strategy = "workers.poolbatch:strategy"
        super().update_strategies()

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], None]:
        dispatch = super().create_task_handler(promise)
        limits = self.intake.limits
        verify = self.intake.verifier.open if self.intake.verifier is not None else None
        connection_errors = self.connection_errors

        def on_task_received(message: Any) -> None:
            try:
                check_task_message(message, limits, verify)
            except Refused as exc:
                return self.refuse(message, exc)
            except Exception as exc:  # a check that met something unforeseen
                return self.refuse(message, Refused("bad_message", f"{type(exc).__name__}: {exc}"))
            if self.already_succeeded(message):
                return None
            try:
                dispatch(message)
            except connection_errors:
                raise
            except Exception as exc:
                self.refuse(
                    message,
                    Refused(
                        "dispatch_error",
                        f"could not be dispatched: {type(exc).__name__}: {str(exc)[:300]}",
                    ),
                )
            return None

        return on_task_received

    def already_succeeded(self, message: Any) -> bool:
        """A redelivered task whose result is already stored as SUCCESS (it ran to the end, then
        its pool process died before the acknowledgement, e.g. in the middle of a pool batch):
        acknowledged without running it again. Only redelivered messages cost the lookup."""
        if not message.delivery_info.get("redelivered"):
            return False
        name, task_id = task_identity(message.headers)
        if task_id is None:
            return False
        try:
            done: bool = self.app.backend.get_task_meta(task_id).get("status") == "SUCCESS"
        except Exception as exc:  # cannot tell: run it (at-least-once)
            log.warning("could not read the result of redelivered %s[%s]: %s", name, task_id, exc)
            return False
        if done:
            log.info("Task %s[%s] redelivered after it had succeeded: acknowledged", name, task_id)
            message.ack_log_error(log, self.connection_errors)
        return done

    def refuse(self, message: Any, exc: Refused) -> None:
        """End this one message: FAILURE stored (when its id is usable), acknowledged, logged."""
        self.intake.refuse(exc, message.headers, "by the consumer")
        if not message.acknowledged:
            message.ack_log_error(log, self.connection_errors)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        if headers.get("compression"):  # kombu tried to decompress it (AMQP: no envelope check)
            refusal = Refused("compressed", "compressed message bodies are not accepted")
            self.refuse(message, refusal)
            return
        self.refuse(message, Refused("not_json", f"the body could not be decoded: {exc}"))

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.refuse(message, Refused("invalid_task", str(exc)[:300]))

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refuse(message, Refused("bad_headers", "not a task message (no 'task' header)"))

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        metrics.record_refused("unknown_task")
        try:
            super().on_unknown_task(body, message, exc)  # stores NotRegistered, rejects
        except Exception as inner:
            self.refuse(message, Refused("unknown_task", f"unknown task: {inner}"))


# ---- the request: poison tasks -----------------------------------------------------------
class GuardedRequest(Request):
    """Celery's request; a task whose pool process died under it (SIGKILL, out of memory, a
    native crash) is requeued as before, until its deliveries have killed
    ``POISON_LOST_DELIVERIES`` processes: then it fails as PoisonTask and is acknowledged."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if (
            isinstance(exc, WorkerLostError)
            and self.task.acks_late
            and self.task.reject_on_worker_lost
            and not worker_state.should_terminate
        ):
            intake = current_intake()
            deliveries = intake.lost_delivery(self.id)
            if deliveries is not None and deliveries >= intake.poison_after:
                return self._fail_poisoned(deliveries, send_failed_event)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _fail_poisoned(self, deliveries: int, send_failed_event: bool) -> None:
        worker_state.task_ready(self)
        poison = PoisonTask(self.name, self.id, deliveries)
        log.error("%s", poison)
        metrics.record_poison(self.name)
        try:
            self.task.backend.mark_as_failure(
                self.id, poison, request=self._context, call_errbacks=False
            )
        except Exception as exc:
            log.error("could not store the FAILURE of %s: %s", self.id, redact(str(exc)))
        self.acknowledge()
        if send_failed_event:
            self.send_event("task-failed", exception=repr(poison), traceback="")
