"""TextBlob's PatternAnalyzer: the lexicon fallback for sentiment (needs no corpora download)."""

from __future__ import annotations

from typing import Any

from shared.families.text import TextClassifier


def polarity_to_label(polarity: float) -> tuple[str, float]:
    """Map TextBlob polarity (-1..1) to (label, score 0..1); exactly 0 is neutral at 0.5."""
    if polarity > 0:
        return "positive", 0.5 + polarity / 2
    if polarity < 0:
        return "negative", 0.5 - polarity / 2
    return "neutral", 0.5


class TextBlobSentiment(TextClassifier):
    """Rule-based sentiment; answers when the transformers model cannot."""

    _analyzer: Any = None
    family = "textblob"
    warm_before_fork = True  # pure Python

    @classmethod
    def preimport(cls) -> None:
        import textblob  # noqa: F401

    def load(self) -> None:
        from textblob.en.sentiments import PatternAnalyzer

        self._analyzer = PatternAnalyzer()

    def warmup(self) -> None:
        self.classify(["warm up"])

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, score) per text, same order."""
        return [polarity_to_label(float(self._analyzer.analyze(t)[0])) for t in texts]

    def unload(self) -> None:
        self._analyzer = None

    def describe(self) -> dict[str, Any]:
        return {"labels": ["negative", "neutral", "positive"]}
