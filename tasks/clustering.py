"""clustering.assign (a registered pipeline) and clustering.fit (KMeans on the request's rows)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from shared.errors import InvalidInput
from shared.families.sklearn_pipeline import SklearnPipeline, fit_kmeans
from tasks.base import ModelTask, call, limits, model_of, predict_one


@shared_task(name="clustering.assign", base=ModelTask, bind=True)
def assign(self: ModelTask, rows: Any, model: Any = "customer_segments") -> dict[str, Any]:
    """Segment label per row from a registered scikit-learn pipeline."""
    args = schemas.assign_args(rows, model, limits())
    registry = self.registry
    pipeline = model_of(registry, args.model, SklearnPipeline, "model", "a clustering pipeline")
    width = len(args.rows[0])
    if pipeline.n_features and width != pipeline.n_features:
        names = f" ({', '.join(pipeline.features)})" if pipeline.features else ""
        raise InvalidInput(
            "rows[0]",
            f"has {width} values but model {args.model!r} expects "
            f"{pipeline.n_features} features{names}",
        )
    answer = predict_one(registry, args.model, args.rows)
    return {
        "labels": answer["outputs"]["labels"],
        "model": answer["model"],
        "version": answer["version"],
    }


@shared_task(name="clustering.fit", base=ModelTask, bind=True)
def fit(self: ModelTask, rows: Any, n_clusters: Any) -> dict[str, Any]:
    """Fit KMeans(n_clusters) on ``rows``: labels, centers, inertia."""
    args = schemas.fit_args(rows, n_clusters, limits())
    result: dict[str, Any] = call(fit_kmeans, args.rows, args.n_clusters, field="rows")
    return result
