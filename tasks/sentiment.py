"""sentiment.analyze and sentiment.analyze_batch: the ``sentiment`` model, TextBlob fallback."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from celery import shared_task

from shared import schemas
from shared.batching import MicroBatcher
from shared.errors import InferenceTimeout
from shared.registry import ModelRegistry
from shared.settings import get_settings
from tasks.base import ModelTask, infer, limits

MODEL = "sentiment"
log = logging.getLogger(__name__)


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


_batcher: MicroBatcher[str, dict[str, Any]] | None = None
_batcher_lock = threading.Lock()


def lane_plan(registry: ModelRegistry) -> tuple[int, int]:
    """(lanes, torch threads per lane) of this process's micro-batcher: BATCH_LANES, or on a
    CPU two lanes that split the process's torch threads; one lane on CUDA."""
    settings = get_settings()
    threads = settings.resolved_torch_threads(1)  # the threads pool: one serving process
    lanes = settings.batch_lanes
    if not lanes:
        try:
            device = str(getattr(registry.get_with_fallback(MODEL)[0], "device", "cpu"))
        except Exception:  # not loaded (yet): plan for the CPU
            device = "cpu"
        lanes = 1 if device.startswith("cuda") or threads < 2 else 2
    return lanes, max(1, threads // lanes)


def batcher(registry: ModelRegistry) -> MicroBatcher[str, dict[str, Any]]:
    """This process's micro-batcher for sentiment (created on first use, after fork)."""
    global _batcher
    with _batcher_lock:
        if _batcher is None:
            settings = get_settings()
            lanes, per_lane = lane_plan(registry)

            def lane_init() -> None:
                # OpenMP thread counts are per calling thread: each lane runs its forward
                # passes on its share of the cores. One thread per lane also served a lone
                # request faster here than handing it every thread (docs/architecture.md).
                if lanes > 1 and "torch" in sys.modules:
                    sys.modules["torch"].set_num_threads(per_lane)

            limit = registry.inference_limit(MODEL)
            _batcher = MicroBatcher(
                lambda texts: classify(registry, texts),
                max_size=settings.batch_max_size,
                window=settings.batch_window_ms / 1000,
                name="sentiment-batcher",
                lanes=lanes,
                lane_init=lane_init,
                stuck_after=limit,
                on_timeout=lambda: InferenceTimeout(MODEL, None, limit),
            )
            registry.extra_stats["sentiment_batching"] = _batcher.stats
            log.info(
                "sentiment micro-batcher: %d lane(s) x %d torch thread(s), up to %d texts per "
                "batch, window %.1f ms",
                lanes,
                per_lane,
                settings.batch_max_size,
                settings.batch_window_ms,
            )
        return _batcher


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
    if not in_pool_thread():
        # prefork child / solo: one task at a time in this process, nothing to batch with
        return classify(self.registry, [text])[0]
    # threads pool: concurrent requests in this process share forward passes
    return batcher(self.registry).submit(text, timeout=waiting_limit(self.registry))


@shared_task(name="sentiment.analyze_batch", base=ModelTask, bind=True)
def analyze_batch(self: ModelTask, texts: Any) -> list[dict[str, Any]]:
    """Sentiment of each text, same order: one batch, or in the threads pool with more than one
    lane (CPU), through the micro-batcher's lanes beside the single texts."""
    texts = schemas.sentiment_texts(texts, limits())
    if in_pool_thread():
        shared = batcher(self.registry)
        if shared.lanes > 1:  # on the lanes' torch threads, not on top of them
            return shared.submit_many(texts, timeout=waiting_limit(self.registry))
    return classify(self.registry, texts)  # one forward pass on a GPU, however many texts
