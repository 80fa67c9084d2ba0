"""The one base class every model family implements (after MLServer's ``MLModel``)."""

from __future__ import annotations

from typing import Any, ClassVar

from shared.manifest import ModelSpec


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
    #: Runs on the registry's device (MODEL_DEVICE: cpu, cuda, auto); others always on the CPU.
    uses_device: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, *, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.warmed_before_fork = False  # set by ModelRegistry.warm_all(before_fork=True)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

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
