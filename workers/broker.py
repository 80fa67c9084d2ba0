"""The task broker: Redis (the default, REDIS_URL) or RabbitMQ (BROKER_URL=amqp://...).

Results, the registry, heartbeats and reload always live on REDIS_URL; only task messages move
to RabbitMQ. There, every task queue is a quorum queue (replicated, durable, survives a broker
restart) with a delivery limit (``x-delivery-limit``: a message returned that many times is
dropped, so that a message that kills whatever takes it cannot circulate for ever), publishes
are confirmed by the broker, and the prefetch is per consumer (quorum queues have no global
QoS; Celery's ``worker_detect_quorum_queues`` sees the queue type and sets it so).

Every process that declares a queue must declare it with the same arguments, or RabbitMQ
refuses the declaration (``PRECONDITION_FAILED - inequivalent arg``): the workers, the CLI and
``workers.client`` all take them from :func:`queue_arguments`, and a queue created on first use
(a model's queue, ``-Q gpu``) gets them too (:class:`BrokerQueues`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from celery.app.amqp import AMQP, Queues

from shared.queues import QueueStats, amqp_queue_stats, queue_stats
from shared.settings import Settings
from shared.urls import broker_connection_url, is_amqp, redis_client

QUEUE_ARGUMENTS_KEY = "modelworkers_queue_arguments"  # our key in Celery's configuration


def queue_arguments(settings: Settings) -> dict[str, Any]:
    """The arguments of every task queue on RabbitMQ."""
    return {"x-queue-type": "quorum", "x-delivery-limit": settings.broker_delivery_limit}


def celery_options(settings: Settings, url: str | None = None) -> dict[str, Any]:
    """Celery settings for the broker at ``url`` (default: BROKER_URL, else REDIS_URL) that
    differ between Redis and RabbitMQ (the workers', the CLI's and the client's)."""
    url = url or broker_connection_url(settings)
    if not is_amqp(url):
        return {"broker_url": url}
    return {
        "broker_url": url,
        # Celery's documented settings for quorum queues
        "task_default_queue_type": "quorum",
        "task_create_missing_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
        "broker_transport_options": {"confirm_publish": True},
        QUEUE_ARGUMENTS_KEY: queue_arguments(settings),
    }


class BrokerQueues(Queues):
    """Celery's queue table; on RabbitMQ, each quorum queue in it (the default one, and one
    created on first use) carries the arguments of :func:`queue_arguments`."""

    def __init__(self, *args: Any, extra_arguments: dict[str, Any] | None = None, **kw: Any):
        self.extra_arguments = dict(extra_arguments or {})
        super().__init__(*args, **kw)

    def _add(self, queue: Any) -> Any:
        args = queue.queue_arguments or {}
        if self.extra_arguments and args.get("x-queue-type") == "quorum":
            queue.queue_arguments = {**self.extra_arguments, **args}
        return super()._add(queue)


class BrokerAMQP(AMQP):
    """Celery's AMQP helper with :class:`BrokerQueues` (``Celery(amqp=...)``)."""

    @property
    def queues_cls(self) -> Any:
        extra = self.app.conf.get(QUEUE_ARGUMENTS_KEY)
        return partial(BrokerQueues, extra_arguments=extra)


def queue_reader(
    settings: Settings, *, timeout: float = 5.0, transport_options: dict[str, Any] | None = None
) -> Callable[[list[str]], list[QueueStats]]:
    """A function that reads the depth (and, on Redis, the oldest age) of the named queues
    from this deployment's broker (shared.queues), each call on a fresh, short connection to
    RabbitMQ or through one Redis client."""
    url = broker_connection_url(settings)
    if is_amqp(url):
        from kombu import Connection

        def read_amqp(queues: list[str]) -> list[QueueStats]:
            with Connection(url, connect_timeout=timeout) as conn:
                conn.ensure_connection(max_retries=1)
                return amqp_queue_stats(conn, queues)

        return read_amqp
    options = transport_options or {}
    client = redis_client(
        settings.model_copy(update={"redis_url": url}) if settings.broker_url else settings,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )

    def read_redis(queues: list[str]) -> list[QueueStats]:
        return queue_stats(
            client,
            queues,
            settings.key_prefix,
            **{k: options[k] for k in ("priority_steps", "global_keyprefix") if k in options},
        )

    return read_redis
