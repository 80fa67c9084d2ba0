"""What every modelworkers task shares: the registry, input limits, counters, expected errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from celery import Task

from shared.errors import InvalidInput, ModelNotFound, ModelNotReady, ModelWorkersError
from shared.families import Model
from shared.registry import ModelRegistry, get_registry
from shared.schemas import Limits
from shared.settings import get_settings

M = TypeVar("M", bound=Model)


@lru_cache(maxsize=1)
def limits() -> Limits:
    return Limits.from_settings(get_settings())


class ModelTask(Task):
    """Base class of the model tasks: expected errors are reported without a traceback."""

    abstract = True
    # Client errors, not worker faults: Celery logs them in one line, and the result carries
    # exc_type + a message naming the field / model.
    throws = (ModelWorkersError, InvalidInput, ModelNotFound, ModelNotReady)
    acks_late = True
    reject_on_worker_lost = True

    @property
    def registry(self) -> ModelRegistry:
        return get_registry()


@contextmanager
def served(registry: ModelRegistry, name: str) -> Iterator[None]:
    """Count one call of model ``name`` with its latency and outcome."""
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        registry.observe(name, time.perf_counter() - t0, ok)


def model_of(registry: ModelRegistry, name: str, cls: type[M], field: str, what: str) -> M:
    """``registry.get(name)`` checked to be a ``cls``; else InvalidInput naming ``field``."""
    model = registry.get(name)
    if not isinstance(model, cls):
        raise InvalidInput(field, f"model {name!r} is a {model.family} model, not {what}")
    return model


def call(fn: Callable[..., Any], *args: Any, field: str, **kwargs: Any) -> Any:
    """Run a library call; a ValueError from the library becomes InvalidInput on ``field``."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise InvalidInput(field, f"rejected by the model: {exc}") from None
