"""Hugging Face text-classification models (any local directory or cached hub id)."""

from __future__ import annotations

import threading
from typing import Any

from shared.batching import pad_groups
from shared.families.text import TextClassifier
from shared.manifest import verify_artifact

# Labels a 2- or 3-class checkpoint may use, mapped onto the contract's labels.
_GENERIC = {
    2: {"label_0": "negative", "label_1": "positive"},
    3: {"label_0": "negative", "label_1": "neutral", "label_2": "positive"},
}
_ALIASES = {"neg": "negative", "pos": "positive", "neu": "neutral"}


def resolve_device(requested: str) -> str:
    """auto -> cuda when CUDA is usable here. Call only inside the serving process (after fork)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TransformersSentiment(TextClassifier):
    """A sequence-classification checkpoint run as tokenizer + model in one forward pass.

    Equivalent to ``transformers.pipeline("text-classification")`` (softmax over the logits,
    top label), without the pipeline's per-call overhead. On a GPU a batch runs as one padded
    forward pass; on a CPU as length-sorted forward passes with little padding (option
    ``pad_ratio``). On a CPU a small forward pass (under option ``small_forward_mflop``) runs on
    one torch thread.
    """

    _model: Any = None
    _tokenizer: Any = None
    family = "transformers"
    uses_device = True
    batches = True

    @classmethod
    def preimport(cls) -> None:
        # Importing is fork-safe; computing (or touching CUDA) in the parent is not.
        import torch  # noqa: F401
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        location = self.spec.location
        if not self.spec.options.get("trusted_override"):
            verify_artifact(self.spec)
        self.device = resolve_device(self.device)
        self._tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForSequenceClassification.from_pretrained(location)
        model.eval()
        if self.device != "cpu":
            model.to(self.device)
            if self.spec.options.get("fp16") and self.device.startswith("cuda"):
                model.half()
        self._model = model
        self._torch = torch
        self.max_length = int(self.spec.options.get("max_length", 128))
        # GPUs want one large batch; CPUs waste compute on padding and on waking idle threads,
        # so the deployment's defaults for these (BATCH_PAD_RATIO, TORCH_SMALL_FORWARD_MFLOP)
        # apply on a CPU only; a model file's own option applies everywhere.
        cpu = self.device == "cpu"
        self.pad_ratio = float(
            self.option("pad_ratio", 1.25) if cpu else self.spec.options.get("pad_ratio", 0.0)
        )
        self.small_forward_mflop = float(
            self.option("small_forward_mflop", 30.0)
            if cpu
            else self.spec.options.get("small_forward_mflop", 0.0)
        )
        # ~2 FLOPs per weight per token; the embedding tables are looked up, not multiplied
        embedding = sum(
            p.numel()
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding)
            for p in m.parameters(recurse=False)
        )
        self.flop_per_token = 2 * (sum(p.numel() for p in model.parameters()) - embedding)
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        generic = _GENERIC.get(len(id2label), {})
        self.labels = [
            _ALIASES.get(v.lower(), generic.get(v.lower(), v.lower()))
            for _, v in sorted(id2label.items())
        ]
        # Tokenizers (Rust) are not safe to call from several threads at once (threads pool);
        # the model is (inference only), so the lock covers tokenizing, not forward passes.
        self._lock = threading.Lock()

    def warmup(self) -> None:
        # One text, then a batch of two lengths (the padded/grouped batch path), then one pass
        # on every torch thread (a small pass runs on one). Short on purpose: the activation
        # buffers of a warm-up stay resident in every pool process.
        texts = ["warm up", "warm up the model with a short sentence"]
        self.classify(texts[:1])
        self.classify(texts)
        with self._lock:
            enc = self._tokenizer(texts, padding=True, return_tensors="pt")
        with self._torch.inference_mode():
            self._forward(enc, small_ok=False)

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text, in order."""
        torch = self._torch
        one_pass = len(texts) == 1 or self.pad_ratio <= 0
        with self._lock:  # the tokenizer only: forward passes may run side by side (lanes)
            if one_pass:
                enc = self._tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            else:
                enc = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        with torch.inference_mode():
            if one_pass:
                return self._forward(enc)
            groups = pad_groups([len(ids) for ids in enc["input_ids"]], self.pad_ratio)
            out: list[tuple[str, float]] = [("", 0.0)] * len(texts)
            for group in groups:
                for i, pair in zip(group, self._forward(self._pad(enc, group)), strict=True):
                    out[i] = pair
            return out

    def _pad(self, enc: Any, rows: list[int]) -> dict[str, Any]:
        """Tensors of ``rows`` of an unpadded encoding, padded to the longest of them."""
        tok = self._tokenizer
        width = max(len(enc["input_ids"][i]) for i in rows)
        left = tok.padding_side == "left"
        fills = {"input_ids": tok.pad_token_id or 0, "token_type_ids": tok.pad_token_type_id}
        batch = {}
        for key in enc:
            fill = fills.get(key, 0)
            padded = []
            for i in rows:
                seq = list(enc[key][i])
                pad = [fill] * (width - len(seq))
                padded.append(pad + seq if left else seq + pad)
            batch[key] = self._torch.tensor(padded, dtype=self._torch.long)
        return batch

    def forward_threads(self, tokens: int) -> int:
        """torch threads for a forward pass over ``tokens`` (padded) tokens: one when the pass is
        under ``small_forward_mflop`` (CPU), where waking the other threads costs more than they
        save (docs/architecture.md); else the process's setting."""
        threads = int(self._torch.get_num_threads())
        if threads > 1 and tokens * self.flop_per_token < self.small_forward_mflop * 1e6:
            return 1
        return threads

    def _forward(self, enc: Any, *, small_ok: bool = True) -> list[tuple[str, float]]:
        torch = self._torch
        if self.device != "cpu":
            enc = {k: v.to(self.device) for k, v in enc.items()}
            logits = self._model(**enc).logits.float()
        else:
            threads = torch.get_num_threads()
            wanted = self.forward_threads(enc["input_ids"].numel()) if small_ok else threads
            if wanted == threads:
                logits = self._model(**enc).logits.float()
            else:
                torch.set_num_threads(wanted)
                try:
                    logits = self._model(**enc).logits.float()
                finally:
                    torch.set_num_threads(threads)
        probs = torch.softmax(logits, dim=-1)
        scores, idx = probs.max(dim=-1)
        pairs = zip(idx.tolist(), scores.tolist(), strict=True)
        return [(self.labels[i], float(s)) for i, s in pairs]

    def memory_bytes(self) -> int | None:
        """Weights and buffers of the network (the tokenizer's few MiB are not counted)."""
        if self._model is None:
            return None
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def unload(self) -> None:

        model = getattr(self, "_model", None)
        self._model = None
        self._tokenizer = None
        if model is not None and self.device.startswith("cuda"):
            del model
            self._torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self._model.parameters()) if self._model else 0
        return {
            "labels": self.labels,
            "parameters": params,
            "max_length": self.max_length,
            "pad_ratio": self.pad_ratio,
            "small_forward_mflop": self.small_forward_mflop,
        }


#: The same family under the name that says what it is: any text classifier, not only sentiment.
TransformersClassifier = TransformersSentiment
