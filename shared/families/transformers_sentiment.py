"""Hugging Face text-classification models (any local directory or cached hub id)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shared import cpu
from shared.batching import pad_groups
from shared.errors import ArtifactError, ManifestError
from shared.families.text import TextClassifier
from shared.families.transformers_onnx import ONNX_FILE, onnxruntime_error, session, weights
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


BACKENDS = ("auto", "onnx", "torch")


def choose_backend(requested: str, device: str, folder: Path) -> str:
    """``onnx`` or ``torch`` for option ``backend`` on ``device`` (resolved) with the model in
    ``folder``. auto: ONNX Runtime on a CPU when ``folder/model.onnx`` exists and onnxruntime
    imports, else torch (torch always on CUDA). An explicit choice that cannot run raises,
    naming the file or the package."""
    if requested not in BACKENDS:
        raise ManifestError(f"option backend: {requested!r} is not one of {', '.join(BACKENDS)}")
    onnx_file = folder / ONNX_FILE
    if requested == "auto":
        usable = device == "cpu" and onnx_file.is_file() and onnxruntime_error() is None
        return "onnx" if usable else "torch"
    if requested == "onnx":
        if device != "cpu":
            raise ManifestError(
                f"option backend: 'onnx' runs on the CPU (onnxruntime's CPU provider), this "
                f"process's device is {device!r}: use backend 'torch' or 'auto' there"
            )
        if not onnx_file.is_file():
            raise ArtifactError(
                f"backend 'onnx' needs {onnx_file}, which does not exist: export it with "
                f"`modelworkers models export-onnx {folder}` (then update the version's sha256)"
            )
        missing = onnxruntime_error()
        if missing is not None:
            raise ImportError(
                f"backend 'onnx' needs onnxruntime, which is not installed: pip install "
                f"'modelworkers[onnx]' ({missing})"
            )
    return requested


class TransformersSentiment(TextClassifier):
    """A sequence-classification checkpoint run as tokenizer + model in one forward pass.

    Equivalent to ``transformers.pipeline("text-classification")`` (softmax over the logits,
    top label), without the pipeline's per-call overhead. On a GPU a batch runs as one padded
    forward pass; on a CPU as length-sorted forward passes with little padding (option
    ``pad_ratio``). On a CPU a small forward pass (under option ``small_forward_mflop``) runs on
    one torch thread.

    Option ``backend`` (``auto``, ``onnx``, ``torch``): the forward passes run in torch, or in
    ONNX Runtime on the folder's ``model.onnx`` (CPU only; ``auto``: ONNX Runtime on a CPU when
    the file exists and onnxruntime imports). An ONNX Runtime session has the process's thread
    budget as intra-op threads. With one thread (prefork with a pool process per core, the
    default) it has no thread pool, so the session opened at load crosses fork: the
    copy-on-write parent's session, its weights pre-packed once, is run by every pool process
    and shared by them. With more threads a session is created in the process that runs it:
    the parent drops its own before fork (``before_fork``), and a pool process opens its own;
    those sessions share the weights read at load (copy-on-write across pool processes) unless
    option ``onnx_prepack`` is true: each session then pre-packs a copy of its own. A batch of at
    least ``SPLIT_MIN_ROWS`` texts on a one-thread session also runs on the cores that idle pool
    processes leave free (``shared.cpu``): its passes are cut into interleaved parts that run
    side by side on the same session, one thread each (a lone ``analyze_batch`` then uses every
    core, not one).
    """

    SPLIT_MIN_ROWS = 8  # fewer texts: one thread (the parts would be too small to pay off)

    _model: Any = None
    _tokenizer: Any = None
    _session: Any = None
    _session_pid: int | None = None
    _weights: dict[str, Any] | None = None
    _lanes: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, threads)
    fork_safe = False  # ONNX Runtime: the session crosses fork (set at load)
    backend = "torch"
    family = "transformers"
    uses_device = True
    batches = True

    @classmethod
    def preimport(cls) -> None:
        # Importing is fork-safe; computing (or touching CUDA) in the parent is not.
        import torch  # noqa: F401
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

        onnxruntime_error()  # imports onnxruntime where installed (it starts no thread)

    def load(self) -> None:
        from transformers import AutoTokenizer

        location = self.spec.location
        if not self.spec.options.get("trusted_override"):
            verify_artifact(self.spec)
        self.device = resolve_device(self.device)
        self.backend = choose_backend(
            str(self.option("backend", "auto")), self.device, Path(location)
        )
        self._tokenizer = AutoTokenizer.from_pretrained(location)
        self.max_length = int(self.spec.options.get("max_length", 128))
        # GPUs want one large batch; CPUs waste compute on padding and on waking idle threads,
        # so the deployment's defaults for these (BATCH_PAD_RATIO, TORCH_SMALL_FORWARD_MFLOP)
        # apply on a CPU only; a model file's own option applies everywhere.
        cpu = self.device == "cpu"
        self.pad_ratio = float(
            self.option("pad_ratio", 1.25) if cpu else self.spec.options.get("pad_ratio", 0.0)
        )
        if self.backend == "onnx":
            id2label = self._load_onnx(Path(location))
        else:
            id2label = self._load_torch(location, cpu)
        generic = _GENERIC.get(len(id2label), {})
        self.labels = [
            _ALIASES.get(v.lower(), generic.get(v.lower(), v.lower()))
            for _, v in sorted(id2label.items())
        ]
        # Tokenizers (Rust) are not safe to call from several threads at once (threads pool);
        # the model is (inference only), so the lock covers tokenizing, not forward passes.
        self._lock = threading.Lock()

    def _load_torch(self, location: str, cpu: bool) -> dict[int, str]:
        import torch
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(location)
        model.eval()
        if self.device != "cpu":
            model.to(self.device)
            if self.spec.options.get("fp16") and self.device.startswith("cuda"):
                model.half()
        self._model = model
        self._torch = torch
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
        return {int(k): str(v) for k, v in model.config.id2label.items()}

    def _load_onnx(self, folder: Path) -> dict[int, str]:
        import numpy
        from transformers import AutoConfig

        self._np = numpy
        self._onnx_path = folder / ONNX_FILE
        self._session_lock = threading.Lock()
        # one intra-op thread: no thread pool, so this session may cross fork (pre-packed, and
        # shared by every pool process); more threads: each process opens its own, on weights
        # read once here (shared copy-on-write), or pre-packed per session with onnx_prepack
        self.fork_safe = self.context.threads <= 1
        self.prepack = bool(self.option("onnx_prepack", False))
        self._weights = {} if self.prepack or self.fork_safe else weights(self._onnx_path)
        self._ort()  # opened here, so that a file ONNX Runtime refuses fails the load
        self.small_forward_mflop = 0.0  # a torch thread switch: not for ONNX Runtime
        self.flop_per_token = 0
        config = AutoConfig.from_pretrained(folder)
        return {int(k): str(v) for k, v in config.id2label.items()}

    def _ort(self) -> Any:
        """This process's ONNX Runtime session: opened on first use in a process, or with one
        thread the one the parent opened, inherited through fork."""
        if self._session is not None and self._session_pid == os.getpid():
            return self._session
        with self._session_lock:
            if self._session is not None and self._session_pid != os.getpid():
                if self.fork_safe:  # no thread pool: this process runs the parent's session
                    self._session_pid = os.getpid()
                    return self._session
                # inherited through a fork nobody announced: never destroyed here, since its
                # destructor would join thread-pool threads that only the parent has
                self._inherited_session = self._session
                self._session = None
            if self._session is None:
                opened = session(self._onnx_path, self.context.threads, self._weights)
                self._onnx_inputs = [i.name for i in opened.get_inputs()]
                self._session, self._session_pid = opened, os.getpid()
            return self._session

    def before_fork(self) -> None:
        # ORT thread pools do not survive fork: each pool process opens its own session (a
        # one-thread session has none: the pool processes share it)
        if self.backend == "onnx" and self._session_pid == os.getpid() and not self.fork_safe:
            self._session = None

    def warmup(self) -> None:
        # One text, then a batch of two lengths (the padded/grouped batch path), then one pass
        # on every torch thread (a small pass runs on one). Short on purpose: the activation
        # buffers of a warm-up stay resident in every pool process.
        texts = ["warm up", "warm up the model with a short sentence"]
        self.classify(texts[:1])
        self.classify(texts)
        if self.backend == "onnx":
            return
        with self._lock:
            enc = self._tokenizer(texts, padding=True, return_tensors="pt")
        with self._torch.inference_mode():
            self._forward(enc, small_ok=False)

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text, in order."""
        one_pass = len(texts) == 1 or self.pad_ratio <= 0
        tensors = "np" if self.backend == "onnx" else "pt"
        with self._lock:  # the tokenizer only: forward passes may run side by side (lanes)
            if one_pass:
                enc = self._tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors=tensors,
                )
            else:
                enc = self._tokenizer(texts, truncation=True, max_length=self.max_length)
        if one_pass:
            return self._passes([(list(range(len(texts))), enc)], len(texts))
        groups = pad_groups([len(ids) for ids in enc["input_ids"]], self.pad_ratio)
        return self._passes([(group, self._pad(enc, group)) for group in groups], len(texts))

    def _passes(self, passes: list[tuple[list[int], Any]], n: int) -> list[tuple[str, float]]:
        """Run each (rows, encoding) forward pass; the answers in row order."""
        out: list[tuple[str, float]] = [("", 0.0)] * n
        if self.backend == "onnx":
            lanes = 1 + cpu.borrowable() if self.fork_safe and n >= self.SPLIT_MIN_ROWS else 1
            run: Callable[..., Iterator[list[tuple[str, float]]]] = map
            if lanes > 1:
                passes, run = self._parts(passes, lanes), self._lanes_for(lanes).map
            answers = run(self._forward_onnx, [enc for _, enc in passes])
            for (rows, _), pairs in zip(passes, answers, strict=True):
                for i, pair in zip(rows, pairs, strict=True):
                    out[i] = pair
            return out
        with self._torch.inference_mode():
            for rows, enc in passes:
                for i, pair in zip(rows, self._forward(enc), strict=True):
                    out[i] = pair
        return out

    def _parts(
        self, passes: list[tuple[list[int], Any]], lanes: int
    ) -> list[tuple[list[int], dict[str, Any]]]:
        """Each pass cut into up to ``lanes`` interleaved parts (rows j, j + lanes, ...)."""
        np = self._np
        parts = []
        for rows, enc in passes:
            k = min(lanes, len(rows))
            for j in range(k):
                part = {name: np.ascontiguousarray(np.asarray(enc[name])[j::k]) for name in enc}
                parts.append((rows[j::k], part))
        return parts

    def _lanes_for(self, lanes: int) -> ThreadPoolExecutor:
        """This process's threads for the parts of a split batch (made after fork, in the
        process that runs them; grown when more cores are free)."""
        pid = os.getpid()
        with self._session_lock:
            if self._lanes is None or self._lanes[0] != pid or self._lanes[1] < lanes:
                if self._lanes is not None and self._lanes[0] == pid:
                    self._lanes[2].shutdown(wait=False)  # its threads end once idle
                pool = ThreadPoolExecutor(lanes, thread_name_prefix="onnx-lane")
                self._lanes = (pid, lanes, pool)
            return self._lanes[2]

    def _pad(self, enc: Any, rows: list[int]) -> dict[str, Any]:
        """Tensors of ``rows`` of an unpadded encoding, padded to the longest of them."""
        tok = self._tokenizer
        width = max(len(enc["input_ids"][i]) for i in rows)
        left = tok.padding_side == "left"
        fills = {"input_ids": tok.pad_token_id or 0, "token_type_ids": tok.pad_token_type_id}
        batch: dict[str, Any] = {}
        for key in enc:
            fill = fills.get(key, 0)
            padded = []
            for i in rows:
                seq = list(enc[key][i])
                pad = [fill] * (width - len(seq))
                padded.append(pad + seq if left else seq + pad)
            if self.backend == "onnx":
                batch[key] = self._np.asarray(padded, dtype=self._np.int64)
            else:
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

    def _forward_onnx(self, enc: Any) -> list[tuple[str, float]]:
        np = self._np
        runner = self._ort()
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        feed = {
            name: np.asarray(enc[name], dtype=np.int64) if name in enc else np.zeros_like(ids)
            for name in self._onnx_inputs
        }
        logits = runner.run(["logits"], feed)[0].astype(np.float32)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = exp / exp.sum(axis=-1, keepdims=True)
        pairs = zip(probs.argmax(axis=-1).tolist(), probs.max(axis=-1).tolist(), strict=True)
        return [(self.labels[i], float(s)) for i, s in pairs]

    def memory_bytes(self) -> int | None:
        """Weights and buffers of the network (the tokenizer's few MiB are not counted); on
        ONNX Runtime its weights, or None when its session holds them (the registry then
        measures the process's growth)."""
        if self.backend == "onnx" and self._weights:
            return int(sum(v.numpy().nbytes for v in self._weights.values()))
        if self._model is None:
            return None
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def unload(self) -> None:
        model = getattr(self, "_model", None)
        self._model = None
        self._tokenizer = None
        if self._session_pid == os.getpid():
            self._session = None
        if self._lanes is not None and self._lanes[0] == os.getpid():
            self._lanes[2].shutdown(wait=False)
        self._lanes = None
        self._weights = None  # after the session: it used them
        if model is not None and self.device.startswith("cuda"):
            del model
            self._torch.cuda.empty_cache()

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "labels": self.labels,
            "backend": self.backend,
            "max_length": self.max_length,
            "pad_ratio": self.pad_ratio,
        }
        if self.backend == "onnx":
            facts["onnx_threads"] = max(1, self.context.threads)
            # shared by the pool processes: the weights read at load, or the whole session
            facts["onnx_shared_weights"] = bool(self._weights) or self.fork_safe
            facts["onnx_session_crosses_fork"] = self.fork_safe
            return facts
        params = sum(p.numel() for p in self._model.parameters()) if self._model else 0
        return {**facts, "parameters": params, "small_forward_mflop": self.small_forward_mflop}


#: The same family under the name that says what it is: any text classifier, not only sentiment.
TransformersClassifier = TransformersSentiment
