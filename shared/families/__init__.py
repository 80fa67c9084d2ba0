"""Model families: one module per family, each a subclass of :class:`shared.families.base.Model`.

Importing this package is cheap: every family imports its ML library inside ``load()`` (or in
``preimport()``, which a worker calls once in the parent process before fork).
"""

from __future__ import annotations

from importlib import import_module

from shared.families.base import Model, ModelContext

FAMILIES: dict[str, str] = {
    "transformers": "shared.families.transformers_sentiment:TransformersSentiment",
    "textblob": "shared.families.textblob_sentiment:TextBlobSentiment",
    "sklearn": "shared.families.sklearn_pipeline:SklearnPipeline",
    "prophet": "shared.families.prophet_forecaster:ProphetForecaster",
    "arima": "shared.families.arima_forecaster:ArimaForecaster",
}


def family_class(family: str, implementation: str = "") -> type[Model]:
    """The Model subclass that serves ``family`` (or the ``implementation`` class named
    ``package.module:Class``). Raises ImportError / TypeError when it cannot be used."""
    target = implementation or FAMILIES[family]
    module_name, _, attr = target.partition(":")
    cls = getattr(import_module(module_name), attr, None)
    if cls is None:
        raise ImportError(f"{module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Model)):
        raise TypeError(f"{target} is not a subclass of shared.families.Model")
    return cls


__all__ = ["FAMILIES", "Model", "ModelContext", "family_class"]
