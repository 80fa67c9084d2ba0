"""What the text classifiers share: ``models.predict`` inputs and answers over ``classify``."""

from __future__ import annotations

from typing import Any

from shared import schemas
from shared.errors import InferenceError
from shared.families.base import Model


class TextClassifier(Model):
    """A family that labels texts. Subclasses implement ``classify(texts) -> [(label, score)]``.

    ``models.predict`` inputs: a text (answer ``{"label", "score"}``) or a list of texts (a list
    of answers, same order). ``predict_batch`` classifies every text of every request at once.
    Limits: options ``max_text_chars`` and ``max_batch_texts`` (defaults: MAX_TEXT_CHARS,
    MAX_BATCH_TEXTS).
    """

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text, in order."""
        raise NotImplementedError

    def validate(self, inputs: Any) -> Any:
        return schemas.text_inputs(
            inputs,
            max_chars=int(self.option("max_text_chars", 10_000)),
            max_texts=int(self.option("max_batch_texts", 256)),
        )

    def predict(self, inputs: Any) -> Any:
        return self.predict_batch([inputs])[0]

    def predict_batch(self, batch: list[Any]) -> list[Any]:
        texts: list[str] = []
        spans = []
        for item in batch:
            items = [item] if isinstance(item, str) else list(item)
            spans.append((len(texts), len(items), isinstance(item, str)))
            texts.extend(items)
        pairs = self.classify(texts)
        if len(pairs) != len(texts):
            raise InferenceError(
                self.name, self.version, f"returned {len(pairs)} results for {len(texts)} inputs"
            )

        out: list[Any] = []
        for start, n, single in spans:
            answers = [
                {"label": label, "score": round(score, 6)}
                for label, score in pairs[start : start + n]
            ]
            out.append(answers[0] if single else answers)
        return out

    def example(self) -> Any:
        return "warm up"
