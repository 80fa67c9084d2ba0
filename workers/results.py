"""The workers' result backend: Celery's Redis backend, one round trip fewer per result.

Before it stores a result, Celery's key-value backends read the task's stored result, so that a
task run twice (a lost worker, a redelivery) never overwrites a SUCCESS. That read is a Redis round
trip for every task, and a run can only meet an earlier result when its message was delivered
before. This backend reads first only then: when the request's delivery says ``redelivered`` (a
message requeued after its pool process died, restored after the visibility timeout, or
redelivered by RabbitMQ), or when the request is unknown. A first delivery stores at once.

``celeryconfig`` selects it (``result_backend = "workers.results:ResultBackend+redis://..."``);
clients read results with Celery's own backend: what is stored is the same.
"""

from __future__ import annotations

from typing import Any

from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend, SentinelBackend
from kombu.utils.encoding import bytes_to_str


def first_delivery(request: Any) -> bool:
    """True when ``request`` is known and its message was delivered once (never requeued)."""
    info = getattr(request, "delivery_info", None)
    return isinstance(info, dict) and info.get("redelivered") is False


class _StoreOnce:
    """``_store_result`` without the read before the write, for first deliveries."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not first_delivery(request):
            return super()._store_result(  # type: ignore[misc]
                task_id, result, state, traceback=traceback, request=request, **kwargs
            )
        backend: Any = self
        meta = backend._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        try:
            backend._set_with_state(backend.get_key_for_task(task_id), backend.encode(meta), state)
        except BackendStoreError as ex:
            raise BackendStoreError(str(ex), state=state, task_id=task_id) from ex
        return result


class ResultBackend(_StoreOnce, RedisBackend):
    """Celery's Redis result backend (redis://, rediss://), storing first deliveries at once."""


class SentinelResultBackend(_StoreOnce, SentinelBackend):
    """Celery's Sentinel result backend (sentinel://), storing first deliveries at once."""


def backend_url(url: str) -> str:
    """The ``result_backend`` setting for a broker URL: this module's backend over ``url``."""
    scheme = url.partition("://")[0]
    cls = "SentinelResultBackend" if scheme == "sentinel" else "ResultBackend"
    return f"workers.results:{cls}+{url}"
