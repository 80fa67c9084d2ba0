"""Model families that misbehave on purpose, served through the production registry and tasks.

Each classifies text like the sentiment family (``classify(texts) -> [(label, score)]``) and
misbehaves only on texts that contain its trigger word, so that one worker can show both the
failure and that the next request is served.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from shared.families.base import Model
from shared.families.text import TextClassifier


class _Classifier(TextClassifier):
    family = "test"
    batches = True  # like the transformers family: concurrent requests share calls

    def load(self) -> None:
        self.calls = 0

    def answer(self, texts: list[str]) -> list[tuple[str, float]]:
        return [("positive" if "good" in t else "negative", 0.75) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"labels": ["negative", "positive"]}


class RaisingClassifier(_Classifier):
    """Raises on every text that contains "boom" (a library error in inference)."""

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        if any("boom" in t for t in texts):
            raise RuntimeError("the model's library failed on this batch")
        return self.answer(texts)


class MiscountingClassifier(_Classifier):
    """Returns one result too many for a batch with a text that contains "miscount"."""

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        out = self.answer(texts)
        return [*out, ("positive", 0.5)] if any("miscount" in t for t in texts) else out


class HangingClassifier(_Classifier):
    """Never returns on a text that contains "hang" (a loop that waits forever)."""

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        if any("hang" in t for t in texts):
            while True:
                time.sleep(0.05)
        return self.answer(texts)


class RecordingClassifier(_Classifier):
    """Appends one JSON line per call (its pid and texts) to the file named by its option
    ``record`` before it answers, then takes ``delay`` seconds: requests meet while it works,
    and a test sees which process runs which batch."""

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        record = self.option("record", "")
        if record:
            with Path(record).open("a") as out:
                out.write(json.dumps({"pid": os.getpid(), "texts": texts}) + "\n")
        time.sleep(float(self.option("delay", 0.0)))
        return self.answer(texts)


class CountingModel(Model):
    """Counts its loads (class-wide); each load takes a little while."""

    family = "test"
    loads = 0

    def load(self) -> None:
        time.sleep(0.05)
        type(self).loads += 1
