"""models.predict: JSON in, JSON out, for any model of the repository (any family)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from tasks.base import ModelTask, predict_one


@shared_task(name="models.predict", base=ModelTask, bind=True, pool_batches=True)
def predict(
    self: ModelTask, model: Any, inputs: Any, version: Any = None, key: Any = None
) -> dict[str, Any]:
    """The answer of model ``model`` to ``inputs`` (what its family takes, as JSON):
    ``{"model", "version", "fallback", "outputs"}``. ``version`` pins the version that answers;
    ``key`` (any string, e.g. a user id) always gets the same version while the model's requests
    are split among versions."""
    args = schemas.predict_model_args(model, version, key)
    registry = self.registry
    if args.version is not None:
        validator = registry.get(args.model, args.version)  # ModelNotReady names the version
    else:
        validator = registry.get_with_fallback(args.model)[0]
    return predict_one(
        registry, args.model, validator.validate(inputs), version=args.version, key=args.key
    )
