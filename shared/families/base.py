"""The one base class every model family implements (after MLServer's ``MLModel``)."""

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
    """A loaded model of one family. Subclasses override ``load`` and their task method.

    The registry calls ``load()`` in a loader thread, then only ever reads the instance; a reload
    builds a new instance beside this one and swaps it in, so instances need no locking of their
    own unless their library is not thread-safe.
    """

    family: ClassVar[str] = ""
    #: The warm-up may run in the copy-on-write parent, before fork: no torch compute and no
    #: OpenMP thread pool (neither survives fork). What it builds lazily (Stan's model, caches,
    #: lexicons) is then built once and shared by every pool process instead of once in each.
    warm_before_fork: ClassVar[bool] = False
    #: Runs on the worker's device (MODEL_DEVICE: cpu, cuda, auto); others always on the CPU.
    uses_device: ClassVar[bool] = False

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

    def unload(self) -> None:
        """Drop references to the model so that its memory can be freed."""

    def describe(self) -> dict[str, Any]:
        """Extra, JSON-safe facts for the registry snapshot (e.g. labels, features)."""
        return {}
