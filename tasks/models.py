"""models.predict: JSON in, JSON out, for any model of the repository (any family)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from shared.errors import ModelNotReady
from tasks.base import ModelTask, predict_one


@shared_task(name="models.predict", base=ModelTask, bind=True)
def predict(self: ModelTask, model: Any, inputs: Any, version: Any = None) -> dict[str, Any]:
    """The answer of model ``model`` to ``inputs`` (what its family takes, as JSON):
    ``{"model", "version", "fallback", "outputs"}``. ``version`` pins the version that answers."""
    args = schemas.predict_model_args(model, version)
    registry = self.registry
    serving, _ = registry.get_with_fallback(args.model)
    if args.version is not None and registry.metadata(args.model).version != args.version:
        raise ModelNotReady(
            args.model,
            "UNLOADED",
            f"version {args.version!r} is not loaded here "
            f"(serving {registry.metadata(args.model).version})",
        )
    return predict_one(registry, args.model, serving.validate(inputs))
