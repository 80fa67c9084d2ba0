"""Model families: one module per family, each a subclass of :class:`shared.families.base.Model`.

Importing this package is cheap: every family imports its ML library inside ``load()`` (or in
``preimport()``, which a worker calls once in the parent process before fork).
"""

from __future__ import annotations

from importlib import import_module

from shared.families.base import Model

FAMILIES: dict[str, str] = {
    "transformers": "shared.families.transformers_sentiment:TransformersSentiment",
    "textblob": "shared.families.textblob_sentiment:TextBlobSentiment",
    "sklearn": "shared.families.sklearn_pipeline:SklearnPipeline",
    "prophet": "shared.families.prophet_forecaster:ProphetForecaster",
    "arima": "shared.families.arima_forecaster:ArimaForecaster",
}


def family_class(family: str) -> type[Model]:
    """The Model subclass that serves ``family``."""
    module_name, _, attr = FAMILIES[family].partition(":")
    cls: type[Model] = getattr(import_module(module_name), attr)
    return cls


__all__ = ["FAMILIES", "Model", "family_class"]
