"""sentiment.analyze and sentiment.analyze_batch: the ``sentiment`` model, TextBlob fallback."""

from __future__ import annotations

import threading
from typing import Any

from celery import shared_task

from shared import schemas
from shared.batching import MicroBatcher
from shared.registry import ModelRegistry
from shared.settings import get_settings
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


_batcher: MicroBatcher[str, dict[str, Any]] | None = None
_batcher_lock = threading.Lock()


def batcher(registry: ModelRegistry) -> MicroBatcher[str, dict[str, Any]]:
    """This process's micro-batcher for sentiment.analyze (created on first use, after fork)."""
    global _batcher
    with _batcher_lock:
        if _batcher is None:
            settings = get_settings()
            _batcher = MicroBatcher(
                lambda texts: classify(registry, texts),
                max_size=settings.batch_max_size,
                window=settings.batch_window_ms / 1000,
                name="sentiment-batcher",
            )
            registry.extra_stats["sentiment_batching"] = _batcher.stats
        return _batcher


@shared_task(name="sentiment.analyze", base=ModelTask, bind=True)
def analyze(self: ModelTask, text: Any) -> dict[str, Any]:
    """Sentiment of one text: {"label", "score", "model", "version", "fallback"}."""
    text = schemas.sentiment_text(text, limits())
    if threading.current_thread() is threading.main_thread():
        # prefork child / solo: one task at a time in this process, nothing to batch with
        return classify(self.registry, [text])[0]
    # threads pool: concurrent requests in this process share forward passes
    return batcher(self.registry).submit(text)


@shared_task(name="sentiment.analyze_batch", base=ModelTask, bind=True)
def analyze_batch(self: ModelTask, texts: Any) -> list[dict[str, Any]]:
    """Sentiment of each text, same order, one forward pass for the whole list."""
    return classify(self.registry, schemas.sentiment_texts(texts, limits()))
