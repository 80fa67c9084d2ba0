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

    def __init__(self, spec: ModelSpec, *, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device

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
