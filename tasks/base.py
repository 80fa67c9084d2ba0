"""What every modelworkers task shares: the registry, input limits, counters, expected errors."""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from celery import Task

from shared import heap, metrics
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
    #: Prefork: concurrent requests of this task may share a pool job and one forward pass
    #: (workers/poolbatch.py); its body must reach the model through ``predict_one``.
    pool_batches = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with heap.task():  # a running task: the heartbeat's idle trim waits for it to end
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
        if count is not None and registry.counting:
            metrics.record_batch(model.name, count)
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
    planned = _BATCH.get()
    if planned is not None:
        found = planned.take(registry, name, inputs, version, key)
        if found is not None:
            return found
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


# ---- batches formed by the consumer (prefork) ---------------------------------------------
# A pool process that receives several requests at once (workers/poolbatch.py) runs each task
# body twice: first *planning* (``predict_one`` records the call it would make and stops the
# body), then, after one ``answer`` per model version for all the planned calls, for real
# through Celery's tracer, where ``predict_one`` returns the answer already computed.


class Planned(Exception):
    """Raised by ``predict_one`` while a batch is planned: the call the task would make."""

    def __init__(self, name: str, inputs: Any, version: str | None, pinned: bool) -> None:
        super().__init__(name)
        self.name = name
        self.inputs = inputs
        self.version = version
        self.pinned = pinned


@dataclass
class BatchSlot:
    """One request of a pool batch: planning it (``call`` is None), or its answer ready."""

    call: Planned | None = None
    outcome: Any = None  # the answer dict, or the exception that request raises
    used: bool = field(default=False)

    def take(
        self,
        registry: ModelRegistry,
        name: str,
        inputs: Any,
        version: str | None,
        key: str | None,
    ) -> dict[str, Any] | None:
        """Planning: raise :class:`Planned`. Answering: the answer computed for this exact call
        (once), else None (the task computes it alone)."""
        if self.call is None:
            chosen = version if version is not None else registry.choose(name, key)
            raise Planned(name, inputs, chosen, version is not None)
        if self.used or self.call.name != name or self.call.inputs != inputs:
            return None
        self.used = True
        if isinstance(self.outcome, BaseException):
            raise copy.copy(self.outcome)
        result: dict[str, Any] = self.outcome
        return result


_BATCH: ContextVar[BatchSlot | None] = ContextVar("modelworkers_batch_slot", default=None)


def plan(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Planned | None:
    """The model call that ``task(*args, **kwargs)`` would make, without making it; None when
    the task fails before it (its error is raised when it runs for real) or calls no model."""
    token = _BATCH.set(BatchSlot())
    try:
        check_arguments(task, args, kwargs)
        task.run(*args, **kwargs)
    except Planned as call:
        return call
    except Exception:
        return None
    finally:
        _BATCH.reset(token)
    return None


def answer_planned(registry: ModelRegistry, calls: list[Planned | None]) -> list[BatchSlot | None]:
    """One ``answer`` per (model, version) for the planned ``calls``; a slot per call with its
    answer, or None where the request must run alone: not planned, or its group's call raised
    anything but an inference timeout (so that one bad input fails only its own request; a
    timeout is not retried request by request)."""
    groups: dict[tuple[str, str | None, bool], list[int]] = {}
    for index, call in enumerate(calls):
        if call is not None:
            groups.setdefault((call.name, call.version, call.pinned), []).append(index)
    slots: list[BatchSlot | None] = [None] * len(calls)
    for (name, version, pinned), members in groups.items():
        planned = [c for c in (calls[i] for i in members) if c is not None]
        try:
            answers: list[Any] = answer(
                registry, name, [c.inputs for c in planned], version=version, pinned=pinned
            )
        except InferenceTimeout as exc:
            answers = [exc] * len(members)
        except Exception:
            continue
        for index, call, outcome in zip(members, planned, answers, strict=True):
            slots[index] = BatchSlot(call, outcome)
    return slots


@contextmanager
def answering(slot: BatchSlot | None) -> Iterator[None]:
    """Run one request of a pool batch with its answer ready (``slot``; None: alone)."""
    token = _BATCH.set(slot)
    try:
        yield
    finally:
        _BATCH.reset(token)
