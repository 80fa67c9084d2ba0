"""A task that reports the thread limits of the pool process running it. Test workers load it
with ``-I tests.support.probe_tasks``."""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import shared_task

from tasks.base import ModelTask


@shared_task(name="tests.thread_limits", base=ModelTask, bind=True)
def thread_limits(self: ModelTask) -> dict[str, Any]:
    """This process's pid, torch threads and each loaded BLAS / OpenMP library's thread limit."""
    from threadpoolctl import threadpool_info

    torch = sys.modules.get("torch")
    pools = {f"{i['internal_api']}:{i['filepath']}": i["num_threads"] for i in threadpool_info()}
    torch_threads = torch.get_num_threads() if torch is not None else None
    return {"pid": os.getpid(), "torch": torch_threads, "pools": pools}
