"""A task that kills the pool process running it on every delivery (a native crash, an input
that runs the process out of memory). Test workers load it with
``-I tests.support.poison_tasks``."""

from __future__ import annotations

import os
import signal

from celery import shared_task

from tasks.base import ModelTask


@shared_task(name="tests.kill_own_process", base=ModelTask, bind=True)
def kill_own_process(self: ModelTask) -> None:
    """SIGKILL this pool process (never returns)."""
    os.kill(os.getpid(), signal.SIGKILL)
