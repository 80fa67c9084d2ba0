"""sentiment.analyze and sentiment.analyze_batch: typed shortcuts to the ``sentiment`` model
(TextBlob as its fallback), over the same path as ``models.predict``."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from shared.registry import ModelRegistry
from tasks.base import ModelTask, limits, predict_many, predict_one

MODEL = "sentiment"


def _flat(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer["outputs"], **{k: answer[k] for k in ("model", "version", "fallback")}}


def classify(registry: ModelRegistry, texts: list[str]) -> list[dict[str, Any]]:
    """Label ``texts`` with the sentiment model (or its fallback), in one call."""
    return [_flat(a) for a in predict_many(registry, MODEL, texts)]


@shared_task(name="sentiment.analyze", base=ModelTask, bind=True, pool_batches=True)
def analyze(self: ModelTask, text: Any) -> dict[str, Any]:
    """Sentiment of one text: {"label", "score", "model", "version", "fallback"}."""
    text = schemas.sentiment_text(text, limits())
    return _flat(predict_one(self.registry, MODEL, text))


@shared_task(name="sentiment.analyze_batch", base=ModelTask, bind=True)
def analyze_batch(self: ModelTask, texts: Any) -> list[dict[str, Any]]:
    """Sentiment of each text, same order: one forward pass, or in the threads pool with more
    than one lane (CPU), through the micro-batcher's lanes beside the single texts."""
    texts = schemas.sentiment_texts(texts, limits())
    return classify(self.registry, texts)
