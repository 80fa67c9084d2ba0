"""sentiment.analyze and sentiment.analyze_batch: the ``sentiment`` model, TextBlob fallback."""

from __future__ import annotations

import threading
from typing import Any

from celery import shared_task

from shared import schemas
from shared.batching import MicroBatcher
from shared.registry import ModelRegistry
from tasks.base import ModelTask, infer, limits

MODEL = "sentiment"


def classify(registry: ModelRegistry, texts: list[str]) -> list[dict[str, Any]]:
    """Label ``texts`` in one forward pass with the sentiment model (or its fallback)."""
    pairs, model, fallback = infer(
        registry,
        MODEL,
        lambda m: m.classify(texts),  # type: ignore[attr-defined]
        count=len(texts),
    )
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


def batcher(registry: ModelRegistry) -> MicroBatcher[Any, Any]:
    """This process's micro-batcher for sentiment (the registry creates it on first use)."""
    return registry.batcher(MODEL, lambda texts: classify(registry, texts))


def waiting_limit(registry: ModelRegistry) -> float:
    """How long a request waits for the micro-batcher: its turn plus the inference time limit
    (a lane stuck in native code past its limit is replaced; the waiters stop waiting here)."""
    return 2 * registry.inference_limit(MODEL) + 1.0


def in_pool_thread() -> bool:
    """True in a threads-pool task (concurrent requests share this process)."""
    return threading.current_thread() is not threading.main_thread()


@shared_task(name="sentiment.analyze", base=ModelTask, bind=True)
def analyze(self: ModelTask, text: Any) -> dict[str, Any]:
    """Sentiment of one text: {"label", "score", "model", "version", "fallback"}."""
    text = schemas.sentiment_text(text, limits())
    registry = self.registry
    if not in_pool_thread():
        # prefork child / solo: one task at a time in this process, nothing to batch with
        return classify(registry, [text])[0]
    # threads pool: concurrent requests in this process share forward passes
    result: dict[str, Any] = batcher(registry).submit(text, timeout=waiting_limit(registry))
    return result


@shared_task(name="sentiment.analyze_batch", base=ModelTask, bind=True)
def analyze_batch(self: ModelTask, texts: Any) -> list[dict[str, Any]]:
    """Sentiment of each text, same order: one batch, or in the threads pool with more than one
    lane (CPU), through the micro-batcher's lanes beside the single texts."""
    texts = schemas.sentiment_texts(texts, limits())
    registry = self.registry
    if in_pool_thread():
        shared = batcher(registry)
        if shared.lanes > 1:  # on the lanes' torch threads, not on top of them
            results: list[dict[str, Any]] = shared.submit_many(
                texts, timeout=waiting_limit(registry)
            )
            return results
    return classify(registry, texts)  # one forward pass on a GPU, however many texts
