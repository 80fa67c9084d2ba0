"""Model families: each a subclass of :class:`shared.families.base.Model`, found by name.

A family is registered under the ``modelworkers.families`` entry-point group of an installed
package (the built-in ones in this project's ``pyproject.toml``); a model file names it with
``family = "NAME"``, or names a class directly with ``implementation = "package.module:Class"``.
Importing this package is cheap: every family imports its ML library inside ``load()`` (or in
``preimport()``, which a worker calls once in the parent process before fork).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points

from shared.families.base import Model, ModelContext

GROUP = "modelworkers.families"


@lru_cache(maxsize=1)
def registered() -> dict[str, str]:
    """Family name -> ``module:Class`` of every installed ``modelworkers.families`` entry point."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def family_class(family: str, implementation: str = "") -> type[Model]:
    """The Model subclass that serves ``family`` (or the ``implementation`` class named
    ``package.module:Class``). Raises ImportError / TypeError naming what is missing."""
    target = implementation
    if not target:
        known = registered()
        if family not in known:
            names = ", ".join(sorted(known)) or "none: is modelworkers installed?"
            raise ImportError(
                f"no model family {family!r} is installed (installed: {names}); install the "
                f"package that provides it (entry point group {GROUP}), or name a class with "
                "implementation = 'package.module:Class'"
            )
        target = known[family]
    module_name, _, attr = target.partition(":")
    cls = getattr(import_module(module_name), attr, None)
    if cls is None:
        raise ImportError(f"{module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"{target} is not a subclass of shared.families.Model")
    return cls


__all__ = ["GROUP", "Model", "ModelContext", "family_class", "registered"]
