"""What every modelworkers task shares: the registry, input limits, counters, expected errors."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from celery import Task

from shared import metrics
from shared.deadline import time_limit
from shared.errors import (
    InferenceError,
    InferenceTimeout,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelWorkersError,
)
from shared.families import Model
from shared.registry import ModelRegistry, get_registry
from shared.schemas import Limits
from shared.settings import get_settings

M = TypeVar("M", bound=Model)
T = TypeVar("T")
log = logging.getLogger("modelworkers.tasks")


@lru_cache(maxsize=1)
def limits() -> Limits:
    return Limits.from_settings(get_settings())


class ModelTask(Task):
    """Base class of the model tasks: expected errors are reported without a traceback."""

    abstract = True
    # Client errors, not worker faults: Celery logs them in one line, and the result carries
    # exc_type + a message naming the field / model.
    throws = (ModelWorkersError, InvalidInput, ModelNotFound, ModelNotReady, InferenceError)
    acks_late = True
    reject_on_worker_lost = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_arguments(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    @property
    def registry(self) -> ModelRegistry:
        return get_registry()


@lru_cache(maxsize=256)
def _parameters(task: Task) -> tuple[list[str], dict[str, bool]]:
    """(positional names, name -> required) of a task's ``run`` (cached per task)."""
    params = inspect.signature(task.run).parameters.values()
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = {p.name: p.default is inspect.Parameter.empty for p in params}
    return positional, required


def check_arguments(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """The arguments fit the task's signature; else InvalidInput naming the argument (a client
    that sends the wrong number of arguments gets the same kind of error as a bad value)."""
    positional, required = _parameters(task)
    takes = ", ".join(positional)
    if len(args) > len(positional):
        raise InvalidInput(
            "arguments", f"{task.name} takes {len(positional)} ({takes}), got {len(args)}"
        )
    given = set(positional[: len(args)])
    for key in kwargs:
        if key not in required:
            raise InvalidInput(str(key)[:64], f"unexpected argument ({task.name} takes {takes})")
        if key in given:
            raise InvalidInput(key, "given both by position and by name")
    for name, needed in required.items():
        if needed and name not in given and name not in kwargs:
            raise InvalidInput(name, "is required")


@contextmanager
def served(registry: ModelRegistry, name: str, version: str | None = None) -> Iterator[None]:
    """Count one call of model ``name`` (its ``version``) with its latency and outcome."""
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        registry.observe(name, time.perf_counter() - t0, ok, version)


def model_of(
    registry: ModelRegistry,
    name: str,
    cls: type[M] | tuple[type[Model], ...],
    field: str,
    what: str,
) -> M:
    """The model ``name`` (or its fallback) checked to be a ``cls``; else InvalidInput naming
    ``field``."""
    model = registry.get_with_fallback(name)[0]
    if not isinstance(model, cls):
        raise InvalidInput(field, f"model {name!r} is a {model.family} model, not {what}")
    return model  # type: ignore[return-value]


def call(fn: Callable[..., Any], *args: Any, field: str, **kwargs: Any) -> Any:
    """Run a library call; a ValueError from the library becomes InvalidInput on ``field``."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OverflowError, FloatingPointError) as exc:
        raise InvalidInput(field, f"rejected by the model: {exc}") from None


def _run_model(
    registry: ModelRegistry, model: Model, call: Callable[[Model], T], count: int | None
) -> T:
    """``call(model)``: counted, within the model's inference time limit, and (``count``) checked
    to return one result per input."""
    limit = registry.inference_limit(model.name)
    with (
        served(registry, model.name, model.version),
        time_limit(limit, lambda: InferenceTimeout(model.name, model.version, limit)),
    ):
        out = call(model)
        if count is not None and (not isinstance(out, list) or len(out) != count):
            got = len(out) if isinstance(out, list) else type(out).__name__
            raise InferenceError(
                model.name, model.version, f"returned {got} results for {count} inputs"
            )
    return out


def infer(
    registry: ModelRegistry,
    name: str,
    call: Callable[[Model], T],
    *,
    count: int | None = None,
    version: str | None = None,
    key: str | None = None,
    pinned: bool = False,
) -> tuple[T, Model, bool]:
    """``(call(model), model, used_fallback)`` for the model ``name`` (the version ``version``
    or ``key`` picks, else one by the model's weights), counted as in flight meanwhile.

    The model answers if it can; when it is not ready, or raises, times out or returns the
    wrong number of results, its declared fallback answers instead (counted in
    ``modelworkers_fallback_answers_total``), unless the caller ``pinned`` the version. Without
    a ready fallback the error names the model (InferenceError / InferenceTimeout). InvalidInput
    is the caller's fault and never falls back.
    """
    with registry.use(name, version, key, allow_fallback=not pinned) as (model, used_fallback):
        try:
            return _run_model(registry, model, call, count), model, used_fallback
        except InvalidInput:
            raise
        except Exception as exc:
            kind = (
                "timeout"
                if isinstance(exc, InferenceTimeout)
                else "bad_batch"
                if isinstance(exc, InferenceError)
                else "error"
            )
            metrics.record_inference_error(model.name, model.version, kind)
            error = (
                exc
                if isinstance(exc, InferenceError)
                else InferenceError(model.name, model.version, f"{type(exc).__name__}: {exc}")
            )
            backup = None if used_fallback or pinned else registry.ready_fallback(name)
            if backup is None:
                raise error from None
    log.warning("%s; its fallback %s answers", error, backup.name)
    metrics.record_fallback(name, backup.name)
    with registry.use(backup.name) as (fallback, _):
        return _run_model(registry, fallback, call, count), fallback, True


def answer(
    registry: ModelRegistry,
    name: str,
    batch: list[Any],
    *,
    version: str | None = None,
    key: str | None = None,
    pinned: bool = False,
) -> list[dict[str, Any]]:
    """Answers to several requests' validated inputs for model ``name``, in one call of its
    ``predict_batch`` (or its fallback's): ``{"outputs", "model", "version", "fallback"}`` each."""
    outputs, model, fallback = infer(
        registry,
        name,
        lambda m: m.predict_batch(batch),
        count=len(batch),
        version=version,
        key=key,
        pinned=pinned,
    )
    return [
        {"outputs": out, "model": model.name, "version": model.version, "fallback": fallback}
        for out in outputs
    ]


def in_pool_thread() -> bool:
    """True in a threads-pool task (concurrent requests share this process)."""
    return threading.current_thread() is not threading.main_thread()


def waiting_limit(registry: ModelRegistry, name: str) -> float:
    """How long a request waits for the micro-batcher: its turn plus the inference time limit
    (a lane stuck in native code past its limit is replaced; the waiters stop waiting here)."""
    return 2 * registry.inference_limit(name) + 1.0


def micro_batched(registry: ModelRegistry, name: str) -> bool:
    """Requests for ``name`` in this process share calls: threads pool, and a family that
    batches."""
    return in_pool_thread() and registry.batches(name)


def predict_one(
    registry: ModelRegistry,
    name: str,
    inputs: Any,
    *,
    version: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """One request's answer from model ``name`` (validated ``inputs``): through the model's
    micro-batcher when concurrent requests in this process can share a call, else alone.
    ``version`` pins the version that answers (alone, no fallback); ``key`` picks the same
    version for the same key when the model's requests are split among versions."""
    if version is not None:
        return answer(registry, name, [inputs], version=version, pinned=True)[0]
    chosen = registry.choose(name, key)
    if micro_batched(registry, name):
        # One batcher per version: a split model's requests are batched per version.
        serving = chosen is None or chosen == registry.serving_version(name)
        batch_key = name if serving else f"{name}@{chosen}"
        pick = None if serving else chosen

        def run(batch: list[Any]) -> list[dict[str, Any]]:
            return answer(registry, name, batch, version=pick)

        batcher = registry.batcher(batch_key, run, model=name)

        result: dict[str, Any] = batcher.submit(inputs, timeout=waiting_limit(registry, name))
        return result
    return answer(registry, name, [inputs], version=chosen)[0]


def predict_many(registry: ModelRegistry, name: str, items: list[Any]) -> list[dict[str, Any]]:
    """Answers to several validated inputs of one task: spread over the micro-batcher's lanes
    when it has more than one (CPU), else one call."""
    if micro_batched(registry, name):
        batcher = registry.batcher(name, lambda batch: answer(registry, name, batch))
        if batcher.lanes > 1:  # on the lanes' torch threads, not on top of them
            results: list[dict[str, Any]] = batcher.submit_many(
                items, timeout=waiting_limit(registry, name)
            )
            return results
    return answer(registry, name, items)
