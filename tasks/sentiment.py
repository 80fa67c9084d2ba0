"""sentiment.analyze and sentiment.analyze_batch: the ``sentiment`` model, TextBlob fallback."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from shared.registry import ModelRegistry
from tasks.base import ModelTask, limits, served

MODEL = "sentiment"


def classify(registry: ModelRegistry, texts: list[str]) -> list[dict[str, Any]]:
    """Label ``texts`` in one forward pass with the sentiment model (or its fallback)."""
    model, fallback = registry.get_with_fallback(MODEL)
    with served(registry, model.name):
        pairs = model.classify(texts)  # type: ignore[attr-defined]
    return [
        {
            "label": label,
            "score": round(score, 6),
            "model": model.name,
            "version": model.version,
            "fallback": fallback,
        }
        for label, score in pairs
    ]


@shared_task(name="sentiment.analyze", base=ModelTask, bind=True)
def analyze(self: ModelTask, text: Any) -> dict[str, Any]:
    """Sentiment of one text: {"label", "score", "model", "version", "fallback"}."""
    return classify(self.registry, [schemas.sentiment_text(text, limits())])[0]


@shared_task(name="sentiment.analyze_batch", base=ModelTask, bind=True)
def analyze_batch(self: ModelTask, texts: Any) -> list[dict[str, Any]]:
    """Sentiment of each text, same order, one forward pass for the whole list."""
    return classify(self.registry, schemas.sentiment_texts(texts, limits()))
