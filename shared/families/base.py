"""The one base class every model family implements (after MLServer's ``MLModel``): the public
plugin API of modelworkers. A family is a subclass registered under the ``modelworkers.families``
entry-point group (or named in a model file as ``implementation = "package.module:Class"``).

Life of an instance, all in the serving process that owns it::

    model = Family(spec, context)    # spec: the model file's entry; context: device, threads
    model.load()                     # in a loader thread; may raise (the model is then FAILED)
    model.warmup()                   # once, before the process says READY
    model.validate(inputs)           # per request, before the model is called
    model.predict(inputs)            # per request (or predict_batch for several at once)
    model.before_fork()              # copy-on-write parent only: drop what cannot cross a fork
    model.unload()                   # on reload (the old instance), unload, shutdown

What a family may rely on:

* ``self.spec``: the model's name, version, family, options (``self.option(key, default)``
  merges the model file's options over the deployment's defaults) and ``self.spec.location``,
  the artifact's absolute path (check it with ``shared.manifest.verify_artifact(self.spec)``
  before reading it: it checks the sha256 the model file lists).
* ``self.device`` (``cpu``, or for a family with ``uses_device`` the worker's ``MODEL_DEVICE``:
  ``cuda``, ``cuda:1``, or ``auto`` to resolve in ``load``) and ``self.context.threads``, the
  serving process's thread budget (torch, BLAS). The family reads no global settings.
* ``load``, ``warmup`` and ``unload`` run one at a time per instance; ``predict`` and
  ``predict_batch`` may run from several threads at once in the threads pool (lock what your
  library cannot share).
* Errors: raise :class:`shared.errors.InvalidInput` from ``validate`` (naming the field, the
  caller's fault); anything raised by ``predict`` is a model failure, answered by the model's
  fallback if it has one, else returned as ``InferenceError`` naming the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared.manifest import ModelSpec


@dataclass(frozen=True)
class ModelContext:
    """What the registry that loads a model gives it, besides its spec.

    ``device`` is where the model runs: ``cpu``, or for a family with ``uses_device`` the
    worker's device (``cuda``, ``cuda:1``, or ``auto``, which the family resolves in ``load``).
    ``threads`` is the serving process's thread budget (torch / BLAS). ``defaults`` are the
    deployment's defaults for options the model file does not set (``Model.option``).
    """

    device: str = "cpu"
    threads: int = 1
    defaults: Mapping[str, Any] = field(default_factory=dict)


class Model:
    """A loaded model of one family. Subclasses override ``load`` and ``predict`` at least."""

    #: The family's name (informational; the registry finds families by entry-point name).
    family: ClassVar[str] = ""
    #: The warm-up may run in the copy-on-write parent, before fork: no torch compute and no
    #: OpenMP thread pool (neither survives fork). What it builds lazily (Stan's model, caches,
    #: lexicons) is then built once and shared by every pool process instead of once in each.
    warm_before_fork: ClassVar[bool] = False
    #: Runs on the worker's device (MODEL_DEVICE: cpu, cuda, auto); others always on the CPU.
    uses_device: ClassVar[bool] = False
    #: ``predict_batch`` answers several requests in one call faster than one by one (one
    #: forward pass): the worker then gathers concurrent requests into micro-batches for it.
    batches: ClassVar[bool] = False

    def __init__(
        self, spec: ModelSpec, context: ModelContext | None = None, *, device: str | None = None
    ) -> None:
        """``device=`` alone is the older way to give the device (kept for a release): it means
        ``context=ModelContext(device=...)``."""
        self.spec = spec
        if context is None:
            context = ModelContext(device=device) if device is not None else ModelContext()
        self.context = context
        self.device = self.context.device
        self.warmed_before_fork = False  # set by ModelRegistry.warm_all(before_fork=True)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def option(self, key: str, default: Any = None) -> Any:
        """The model file's option ``key``, else the deployment's default, else ``default``."""
        if key in self.spec.options:
            return self.spec.options[key]
        return self.context.defaults.get(key, default)

    @classmethod
    def preimport(cls) -> None:
        """Import the family's libraries (called in the parent before fork; must not compute)."""

    def load(self) -> None:
        """Read the artifact and make the model ready to predict."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run one tiny prediction so that the first real request is warm."""
        example = self.example()
        if example is not None:
            self.predict(self.validate(example))

    def validate(self, inputs: Any) -> Any:
        """Check one request's ``inputs`` (decoded JSON) and return what ``predict`` takes;
        raise ``InvalidInput("inputs...", problem)`` naming the field. Default: as given."""
        return inputs

    def predict(self, inputs: Any) -> Any:
        """The answer to one request's validated inputs: JSON-safe (dicts, lists, str, numbers)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement predict()")

    def predict_batch(self, batch: list[Any]) -> list[Any]:
        """The answers to several requests' validated inputs, one per input, in order. Override
        it (with ``batches = True``) when one call is cheaper than many; the default loops."""
        return [self.predict(inputs) for inputs in batch]

    def example(self) -> Any:
        """Small, valid inputs (before ``validate``) for the warm-up and the rehearsal before
        READY; None: neither runs a prediction."""
        return None

    def memory_bytes(self) -> int | None:
        """The loaded model's memory, if the family can tell exactly (e.g. its tensors); None:
        the registry measures the process's growth over the load instead."""
        return None

    def before_fork(self) -> None:
        """Drop what must not cross a fork (a runtime's thread pool or session): called in the
        copy-on-write parent after its loads; the pool process opens its own on first use
        (its warm-up runs before it serves)."""

    def unload(self) -> None:
        """Drop references to the model so that its memory can be freed."""

    def describe(self) -> dict[str, Any]:
        """Extra, JSON-safe facts for the registry snapshot (e.g. labels, features)."""
        return {}
