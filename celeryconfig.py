"""Celery settings, mapped from :class:`shared.settings.Settings`. Nothing else lives here.

Loaded by ``workers.app`` with ``app.config_from_object("celeryconfig")``.
"""

from __future__ import annotations

from typing import Any as _Any

from shared.settings import get_settings as _get_settings
from shared.urls import is_amqp as _is_amqp
from shared.urls import redis_connection_url as _redis_connection_url
from workers.broker import celery_options as _broker_options
from workers.results import backend_url as _backend_url

_s = _get_settings()

# Where REDIS_URL is unset and no `modelworkers up` started an embedded Redis, a plain
# `celery -A workers.app worker` talks to a local Redis on the default port.
_redis_url = _redis_connection_url(_s)
# Celery's Redis backend, without its read-before-write for a first delivery (workers/results.py)
result_backend = _backend_url(_redis_url)
# The task broker: BROKER_URL (Redis or RabbitMQ), else REDIS_URL (workers/broker.py)
_broker = _broker_options(_s)
broker_url: str = _broker.pop("broker_url")

# JSON only: a pickled message is rejected and never deserialized.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
event_serializer = "json"
# MESSAGE_SIGNING: tasks and remote-control messages signed with Celery's auth serializer, and
# only signed ones accepted (task_serializer "auth", accept_content ["auth"], security_*);
# results and events stay JSON. workers.app registers the serializer (docs/security.md).
if _s.message_signing:
    from workers.signing import celery_options as _signing_options

    globals().update(_signing_options(_s))

# At-least-once: acknowledge after the task ran; requeue when the pool process dies mid-task.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = _s.prefetch_multiplier
broker_transport_options: dict[str, _Any] = {
    "visibility_timeout": _s.visibility_timeout_seconds,
    # How often a live worker looks for a dead node's unacknowledged tasks. kombu's defaults
    # (every 10 s, throttled x10) add ~100 s on top of the visibility timeout.
    "unacked_restore_interval": max(1, min(10, _s.visibility_timeout_seconds // 10)),
    "unacked_restore_throttle": 1,
}
if _is_amqp(broker_url):
    # RabbitMQ returns a dead consumer's unacknowledged messages itself: no visibility timeout.
    # Quorum queues with a delivery limit, confirmed publishes (workers/broker.py).
    broker_transport_options = _broker.pop("broker_transport_options")
    globals().update(_broker)
# REDIS_URL=sentinel://HOST:26379;sentinel://HOST2:26379/0: the broker and the result backend
# connect to the master the sentinels name for REDIS_SENTINEL_MASTER.
if broker_url.startswith("sentinel://"):
    broker_transport_options["master_name"] = _s.redis_sentinel_master
# A result write that meets a Redis blip is retried instead of failing the task.
result_backend_always_retry = True
result_backend_max_retries = 10
result_backend_transport_options: dict[str, _Any] = {"retry_policy": {"timeout": 5.0}}
if _redis_url.startswith("sentinel://"):
    result_backend_transport_options["master_name"] = _s.redis_sentinel_master
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # keep trying while Redis restarts
result_expires = _s.result_expires_seconds
# Inputs are not copied into results unless asked for (RESULT_EXTENDED).
result_extended = _s.result_extended

task_default_queue = _s.task_queue
# Every task to TASK_QUEUE (task_default_queue), except the tasks of a model whose model file
# names a queue of its own.
task_routes = ("workers.routing.route_task",)

task_track_started = _s.track_started
task_time_limit = _s.task_time_limit_seconds
task_soft_time_limit = max(1, _s.task_time_limit_seconds - 10)
# Task events cost time on every task (docs/benchmarks.md); Flower enables them while it watches.
task_send_sent_event = _s.task_events
worker_send_task_events = _s.task_events

worker_concurrency = _s.worker_concurrency
worker_pool = _s.worker_pool
worker_max_tasks_per_child = _s.worker_max_tasks_per_child
worker_max_memory_per_child = _s.worker_max_memory_per_child_kb
# A new pool process must load every eager model before it reports UP; Celery's default 4 s
# kills replacement children in a loop (see docs/architecture.md).
worker_proc_alive_timeout = _s.proc_alive_timeout_seconds
worker_redirect_stdouts = False
# Every task message is checked (shape, size, depth) before Celery dispatches it, and a message
# that fails while being dispatched ends that one task instead of the node (workers/intake.py).
worker_consumer = "workers.intake:GuardedConsumer"
worker_cancel_long_running_tasks_on_connection_loss = False

if "rediss://" in (_redis_url[:9], broker_url[:9]):
    import ssl as _ssl

    _reqs = {
        "required": _ssl.CERT_REQUIRED,
        "optional": _ssl.CERT_OPTIONAL,
        "none": _ssl.CERT_NONE,
    }[_s.redis_tls_cert_reqs]
    _tls = {"ssl_cert_reqs": _reqs, "ssl_ca_certs": _s.redis_tls_ca_certs}
    if _redis_url.startswith("rediss://"):
        redis_backend_use_ssl = _tls
    if broker_url.startswith("rediss://"):
        broker_use_ssl = _tls
