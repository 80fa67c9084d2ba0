"""Every error modelworkers raises, rooted at :class:`ModelWorkersError`.

::

    ModelWorkersError
    ├── ModelNotFound        no model of that name in the manifest / registry
    ├── ModelNotReady        the model exists but is LOADING, FAILED or UNLOADED
    ├── InvalidInput         a task argument failed validation (names the field)
    ├── ManifestError        a manifest entry is malformed (names the entry)
    ├── ArtifactError        an artifact is missing, truncated or fails its sha256
    ├── LoadTimeout          a model load ran past its per-model timeout
    ├── ReloadRefused        a reload request was refused (unknown model/version, busy)
    ├── InvalidMessage       a queued message was refused before any task ran (shape, size)
    ├── PoisonTask           a task's deliveries killed its pool process too many times
    ├── InferenceError       a model raised (or broke its contract) while predicting
    │   └── InferenceTimeout a prediction ran past the model's inference time limit
    ├── TracingUnavailable   TRACING is set but cannot be set up (a package, the exporter):
    │                        the worker does not start
    ├── TaskFailed           client side: a task failed with an error not listed here
    ├── ResultTimeout        client side: no result within the wait (also a TimeoutError)
    └── RedisUnavailable     client side: Redis unreachable, task not sent or result not read
                             (also a ConnectionError)

Errors travel through Celery's JSON result backend as ``exc_type`` + ``exc_message``. Each error
keeps a single, human-readable message as its only positional argument so that a client in any
language reads ``exc_message[0]`` and a Python client that imports this module rebuilds the same
exception. The structured parts (model name, field, state) are attributes.

The last three are raised by the Python client (``workers.client``), never by a worker: the
client raises the class above named by a failed task's ``exc_type``, and ``TaskFailed`` for any
other ``exc_type`` (Celery's own errors, a bug in a model).
"""

from __future__ import annotations


class ModelWorkersError(Exception):
    """Root of all modelworkers errors."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ModelNotFound(ModelWorkersError):
    """No model of this name is listed in the manifest or held by the registry."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        if known is None:  # rebuilt from a serialized message
            super().__init__(name)
            self.name = name
            return
        hint = f"; known models: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"model {name!r} is not in the manifest{hint}")
        self.name = name


class ModelNotReady(ModelWorkersError):
    """The model is known but cannot serve: it is LOADING, FAILED or UNLOADED."""

    def __init__(self, name: str, state: str | None = None, reason: str | None = None) -> None:
        if state is None:
            super().__init__(name)
            self.name, self.state, self.reason = name, "", reason
            return
        why = f": {reason}" if reason else ""
        super().__init__(f"model {name!r} is not ready (state {state}){why}")
        self.name, self.state, self.reason = name, state, reason


class InvalidInput(ModelWorkersError):
    """A task argument failed validation; the message starts with the field's path."""

    def __init__(self, field: str, problem: str | None = None) -> None:
        if problem is None:
            super().__init__(field)
            self.field = field.split(":", 1)[0]
            return
        super().__init__(f"{field}: {problem}")
        self.field = field


class ManifestError(ModelWorkersError):
    """A manifest entry (or the manifest file) is malformed."""


class ArtifactError(ModelWorkersError):
    """An artifact is missing, unreadable, or its sha256 differs from the manifest."""


class LoadTimeout(ModelWorkersError):
    """A model load ran past its per-model load timeout."""


class ReloadRefused(ModelWorkersError):
    """A reload request was refused before anything was loaded."""


class InvalidMessage(ModelWorkersError):
    """The worker refused a queued message before any task code ran: its body, headers or
    envelope broke a limit (nesting depth, size, argument count) or Celery's message format.
    The task is not retried: the same message would be refused again."""


class PoisonTask(ModelWorkersError):
    """A task whose deliveries killed the pool process running it too many times."""

    def __init__(self, task: str, task_id: str | None = None, deliveries: int | None = None):
        if task_id is None or deliveries is None:  # rebuilt from a serialized message
            super().__init__(task)
            return
        super().__init__(
            f"task {task}[{task_id}] killed its pool process on {deliveries} deliveries; "
            "it is not delivered again (MODELWORKERS_POISON_LOST_DELIVERIES)"
        )


class InferenceError(ModelWorkersError):
    """A model failed while predicting (and no fallback could answer). Names the model."""

    def __init__(self, model: str, version: str | None = None, problem: str | None = None):
        if problem is None:  # rebuilt from a serialized message
            super().__init__(model)
            self.model = model
            return
        at = f"@{version}" if version else ""
        super().__init__(f"model {model!r}{at} failed: {problem}")
        self.model = model


class InferenceTimeout(InferenceError):
    """A prediction ran past the model's inference time limit."""

    def __init__(self, model: str, version: str | None = None, seconds: float | None = None):
        if seconds is None:
            super().__init__(model)
            return
        super().__init__(
            model, version, f"no answer within its inference time limit of {seconds:g} s"
        )


class TracingUnavailable(ModelWorkersError):
    """TRACING asks for traces that this installation cannot produce: a package is missing or
    the exporter cannot be loaded. The message names the setting and what to install."""

    def __init__(self, choice: str, problem: str | None = None) -> None:
        if problem is None:  # rebuilt from a serialized message
            super().__init__(choice)
            return
        super().__init__(f"MODELWORKERS_TRACING={choice}: {problem}")


class TaskFailed(ModelWorkersError):
    """A task failed with an ``exc_type`` that is not one of the errors above (Celery's
    ``NotRegistered``, ``TimeLimitExceeded``, ``TaskRevokedError``, a bug's ``ValueError``...).
    ``exc_type`` and ``message`` are what the worker stored; ``str()`` shows both."""

    def __init__(self, message: str, exc_type: str = "", task_id: str | None = None) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.task_id = task_id

    def __str__(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.exc_type else self.message


class ResultTimeout(ModelWorkersError, TimeoutError):
    """No result arrived within the client's wait. The task may still run (or wait in a queue no
    worker consumes): its result can be read later by its ``task_id``."""

    def __init__(self, task_id: str, seconds: float | None = None, state: str = "PENDING") -> None:
        self.task_id = task_id
        self.seconds = seconds
        self.state = state
        if seconds is None:  # rebuilt from a serialized message
            super().__init__(task_id)
            return
        super().__init__(
            f"no result for task {task_id} after waiting {seconds:g} s (state {state}); "
            "it may still be queued or running"
        )


class RedisUnavailable(ModelWorkersError, ConnectionError):
    """Redis could not be reached: the task was not sent, or its result or the registry not
    read. Says what was being done and Redis' own error (passwords hidden)."""
