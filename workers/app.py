"""The Celery application. Start a worker with ``celery -A workers.app worker``."""

from __future__ import annotations

from celery import Celery

from shared.settings import get_settings
from workers.intake import register_transport
from workers.signing import setup as setup_signing

# Redis envelopes are decoded under a guard in every process that uses this app (workers.intake).
register_transport()

app = Celery(
    "modelworkers",
    amqp="workers.broker:BrokerAMQP",  # RabbitMQ: every quorum queue with its delivery limit
    include=[
        "tasks.sentiment",
        "tasks.forecasting",
        "tasks.clustering",
        "tasks.models",
        "tasks.control",
    ],
)
app.config_from_object("celeryconfig")
# MESSAGE_SIGNING: sign what this process sends, accept only signed tasks (workers.signing).
setup_signing(app, get_settings())

# Connect the signal handlers and remote-control commands (import for side effect).
from workers import control, signals  # noqa: E402, F401
from workers.bootsteps import RegistryStats  # noqa: E402

app.steps["worker"].add(RegistryStats)
