"""The broker a test runs on: the session's Redis, or a RabbitMQ virtual host of this run's own.

RabbitMQ is the server at 127.0.0.1:5672 (guest/guest, override with RABBITMQ_HOST/PORT); each
test session creates a vhost ``mwtest-<hex>`` with ``rabbitmqctl`` and deletes it at the end, so
that messages left by another run (or a parallel one) can never reach this run's workers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from shared.settings import Settings

HOST = os.environ.get("RABBITMQ_HOST", "127.0.0.1")
PORT = int(os.environ.get("RABBITMQ_PORT", "5672"))
# What the workers declare (workers.broker.queue_arguments with the default delivery limit): a
# plain Celery client declares its queue with the same arguments, or RabbitMQ refuses it.
QUEUE_ARGUMENTS = {
    "x-queue-type": "quorum",
    "x-delivery-limit": Settings.model_fields["broker_delivery_limit"].default,
}


def rabbitmq_problem() -> str | None:
    """Why RabbitMQ cannot be used by the tests here, or None."""
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError as exc:
        return f"RabbitMQ is not reachable at {HOST}:{PORT} ({exc})"
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not on PATH (needed to create the test run's vhost)"
    return None


def _ctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


@dataclass
class RabbitVhost:
    """A RabbitMQ virtual host of one test run, for user guest."""

    name: str

    @classmethod
    def create(cls) -> RabbitVhost:
        vhost = cls(f"mwtest-{uuid.uuid4().hex[:12]}")
        _ctl("add_vhost", vhost.name)
        _ctl("set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
        return vhost

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{PORT}/{quote(self.name, safe='')}"

    def delete(self) -> None:
        _ctl("delete_vhost", self.name)

    def messages(self, queue: str) -> int:
        """Messages in ``queue``, ready and unacknowledged (0: no such queue)."""
        out = _ctl("list_queues", "-p", self.name, "-q", "--no-table-headers", "name", "messages")
        for line in out.splitlines():
            name, _, count = line.rpartition("\t")
            if name == queue:
                return int(count)
        return 0


@dataclass
class Broker:
    """The broker of a parametrized test: ``kind`` is redis or amqp; ``url(redis_url)`` the
    broker URL for a run whose Redis (results, registry) is ``redis_url``."""

    kind: str
    vhost: RabbitVhost | None = None

    def url(self, redis_url: str) -> str:
        return self.vhost.url if self.vhost is not None else redis_url

    def env(self) -> dict[str, str]:
        """What a worker process needs beyond REDIS_URL."""
        return {"MODELWORKERS_BROKER_URL": self.vhost.url} if self.vhost is not None else {}

    def client_conf(self, queue: str) -> dict[str, Any]:
        """Celery settings of a plain client (task names and JSON only) for ``queue``."""
        if self.vhost is None:
            return {"task_default_queue": queue}
        from kombu import Exchange, Queue

        return {
            "task_default_queue": queue,
            "task_queues": [
                Queue(queue, Exchange(queue), routing_key=queue, queue_arguments=QUEUE_ARGUMENTS)
            ],
        }

    def queue_empty(self, redis_client: Any, queue: str) -> bool:
        """Nothing waiting in ``queue`` and nothing delivered and unacknowledged."""
        if self.vhost is not None:
            return self.vhost.messages(queue) == 0
        return bool(redis_client.llen(queue) == 0 and redis_client.hlen("unacked") == 0)
