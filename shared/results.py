"""The results of the built-in tasks, typed: what ``workers.client`` returns.

Plain pydantic models with no Celery import, so a web app can use them in its own signatures
(FastAPI response models, say) without the client. Each one validates the JSON a task stores
(docs/tasks.md gives the shapes); fields a newer worker adds are ignored, as for the records of
``shared.records``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class TaskResult(BaseModel):
    """Base of the results: fields a newer worker adds are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class Sentiment(TaskResult):
    """``sentiment.analyze`` (and each item of ``sentiment.analyze_batch``)."""

    label: str
    score: float
    model: str  # the model that answered: "sentiment", or its fallback
    version: str
    fallback: bool  # True when the fallback answered


class Forecast(TaskResult):
    """``forecast.prophet``, ``forecast.arima`` and ``forecast.predict``."""

    ds: list[str] | None  # ISO date-times; None for an ARIMA series sent without dates
    yhat: list[float]
    yhat_lower: list[float]
    yhat_upper: list[float]
    model: str
    version: str


class Clusters(TaskResult):
    """``clustering.assign``: one label per row."""

    labels: list[int]
    model: str
    version: str


class KMeansFit(TaskResult):
    """``clustering.fit``: labels, centers (in the input's units) and inertia."""

    labels: list[int]
    centers: list[list[float]]
    inertia: float


class Prediction(TaskResult):
    """``models.predict``: ``outputs`` is what the model's family answers, as JSON."""

    model: str
    version: str
    fallback: bool
    outputs: Any
