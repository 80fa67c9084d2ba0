"""Queue depth and the age of the oldest waiting message, read from the broker (Redis or RabbitMQ).

kombu's Redis transport keeps a queue as a Redis list named after it: a producer LPUSHes a message
at the head, a worker takes the oldest one from the tail (RPOP end). With message priorities the
queue is several lists, ``QUEUE`` for priority 0 and ``QUEUE\\x06\\x16N`` for the other steps N of
``priority_steps`` (default 0, 3, 6, 9); the transport counts a queue's size as the sum of their
lengths, and so does :func:`queue_stats`.

A Celery message carries no time at which it was sent, so the age of the oldest waiting message
is a lower bound: how long the message now at a list's tail has been seen there. Each reader
(the metrics endpoint of every worker node, ``modelworkers status``) reads the tail's id and
keeps the time it first saw it in one Redis hash, ``PREFIX:queue-tails`` (field: list name,
value: ``ID TIME``), so that every reader reports the same figure, on Redis's clock. A queue
whose tail never changes (nobody consumes it) therefore shows its true wait from the first read
on; one that moves shows how long its current tail has been waiting since it became the oldest.

On RabbitMQ (:func:`amqp_queue_stats`) the depth is the ``message_count`` of a passive
``queue.declare``: the messages ready for delivery, not those delivered and not yet acknowledged
(as on Redis, where a delivered message has left the list). AMQP offers no way to look at the
head message without taking it: ``basic.get`` and a requeue would move it, count one delivery
against the queue's delivery limit and mark it redelivered. So the oldest age is not reported
there (None).

Only redis-py (or a kombu connection, for RabbitMQ) is used here, no Celery.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu.transport.redis.PRIORITY_STEPS
TAILS = "queue-tails"
TAILS_TTL_SECONDS = 86_400


@dataclass(frozen=True)
class QueueStats:
    """One queue: messages waiting, and how long its oldest one has waited (a lower bound;
    None where the broker cannot tell: RabbitMQ)."""

    queue: str
    depth: int
    oldest_age_seconds: float | None


def queue_lists(queue: str, priority_steps: Sequence[int] = PRIORITY_STEPS) -> list[str]:
    """The Redis lists that hold ``queue`` (kombu's ``_q_for_pri`` for each priority step)."""
    names = [f"{queue}{PRIORITY_SEP}{step}" if step else queue for step in priority_steps]
    return list(dict.fromkeys(names))


def message_id(raw: bytes | str) -> str:
    """A waiting message's identity: its kombu delivery tag, else its task id, else a digest."""
    try:
        envelope = json.loads(raw)
        properties, headers = envelope.get("properties") or {}, envelope.get("headers") or {}
        tag = properties.get("delivery_tag") or headers.get("id")
        if tag:
            return str(tag)
    except (ValueError, AttributeError, TypeError):
        pass
    data = raw.encode() if isinstance(raw, str) else raw
    return "sha1:" + hashlib.sha1(data).hexdigest()


def queue_stats(
    client: Any,
    queues: Iterable[str],
    prefix: str,
    *,
    priority_steps: Sequence[int] = PRIORITY_STEPS,
    global_keyprefix: str = "",
) -> list[QueueStats]:
    """Depth and oldest age of each queue, in three round trips; records tails first seen now.

    ``prefix`` is KEY_PREFIX (where the first-seen times are kept); ``global_keyprefix`` is the
    Redis transport's own key prefix, when ``broker_transport_options`` sets one. Raises what
    redis-py raises when Redis cannot be read; a failed write of the first-seen times is ignored
    (the ages are then counted from now).
    """
    names = sorted(dict.fromkeys(queues))
    lists = {q: [global_keyprefix + n for n in queue_lists(q, priority_steps)] for q in names}
    every = [name for q in names for name in lists[q]]
    tails_key = f"{prefix}:{TAILS}"
    with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for name in every:
            pipe.llen(name)
            pipe.lindex(name, -1)
        if every:
            pipe.hmget(tails_key, every)
        replies = pipe.execute()
    seconds, micros = replies[0]
    now = float(seconds) + float(micros) / 1e6
    seen_raw = replies[-1] if every else []  # the hash's value per list (None: not seen yet)
    lengths: dict[str, int] = {}
    first_seen: dict[str, float] = {}
    updates: dict[str, str] = {}
    gone: list[str] = []
    for i, name in enumerate(every):
        lengths[name] = int(replies[1 + 2 * i] or 0)
        tail = replies[2 + 2 * i]
        if tail is None:
            if seen_raw[i] is not None:
                gone.append(name)
            continue
        tail_id = message_id(tail)
        stored = seen_raw[i].decode() if isinstance(seen_raw[i], bytes) else seen_raw[i]
        stored_id, _, stored_at = (stored or "").rpartition(" ")
        if stored and stored_id == tail_id:
            first_seen[name] = float(stored_at)
        else:
            first_seen[name] = now
            updates[name] = f"{tail_id} {now:.6f}"
    if updates or gone:
        try:
            with client.pipeline(transaction=False) as pipe:
                if updates:
                    pipe.hset(tails_key, mapping=updates)
                if gone:
                    pipe.hdel(tails_key, *gone)
                pipe.expire(tails_key, TAILS_TTL_SECONDS)
                pipe.execute()
        except Exception:  # a read-only Redis user: report, and count from now next time too
            pass
    return [
        QueueStats(
            queue=q,
            depth=sum(lengths[name] for name in lists[q]),
            oldest_age_seconds=max(
                (max(0.0, now - first_seen[name]) for name in lists[q] if name in first_seen),
                default=0.0,
            ),
        )
        for q in names
    ]


def amqp_queue_stats(connection: Any, queues: Iterable[str]) -> list[QueueStats]:
    """Depth of each queue on RabbitMQ (``connection``: a kombu Connection), by a passive
    ``queue.declare`` each: it reads the queue and changes nothing. A queue that does not exist
    (yet) has depth 0. Raises what kombu raises when the broker cannot be reached."""
    found = []
    for name in sorted(dict.fromkeys(queues)):
        channel = connection.channel()
        try:
            _, depth, _consumers = channel.queue_declare(queue=name, passive=True)
        except connection.channel_errors:  # NOT_FOUND: RabbitMQ closed this channel
            depth = 0
        finally:
            with suppress(Exception):
                channel.close()
        found.append(QueueStats(queue=name, depth=int(depth), oldest_age_seconds=None))
    return found
