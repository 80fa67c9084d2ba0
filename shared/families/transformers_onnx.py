"""ONNX Runtime for the transformers family: export a classifier folder to ``model.onnx``, open
a session on it with the serving process's threads.

``export_onnx(folder)`` traces the folder's ``AutoModelForSequenceClassification`` with
``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the dynamo exporter needs
onnxscript; opset 17, dynamic batch and sequence axes, inputs ``input_ids``,
``attention_mask`` and ``token_type_ids`` when the model takes them, output ``logits``), then
runs the file with ONNX Runtime beside torch and refuses it if a logit differs by more than
``atol``. It needs torch, transformers and the ``onnx`` package; serving needs
``onnxruntime`` (and ``onnx`` to share the weights among pool processes, ``weights``). Nothing
is imported until a function is called.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ArtifactError

ONNX_FILE = "model.onnx"
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Traced with padding (two lengths), so that the mask's path is what the graph records.
TRACE_TEXTS = ["a short one", "a longer sentence, so that the batch is padded"]
CHECK_TEXTS = [
    "ok",
    "An absolute delight, I loved it.",
    "Dreadful, boring and far too long. " * 40,  # truncated at the tokenizer's max length
    "",
]


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote and checked."""

    path: Path
    inputs: tuple[str, ...]
    opset: int
    max_abs_diff: float  # ONNX Runtime vs torch, over CHECK_TEXTS (logits)
    seconds: float


def onnxruntime_error() -> str | None:
    """Why onnxruntime cannot be used here (its ImportError), or None when it imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def weights(path: Path) -> dict[str, Any]:
    """The graph's initializers (its weights) of ``path`` as ONNX Runtime values, to give every
    session made from the file (``session(..., shared=)``): read once in the copy-on-write
    parent, they are shared by every pool process instead of copied into each one's session.
    {} when the ``onnx`` package (which reads the file) is not installed: each session then
    holds its own copy."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return {}
    import onnxruntime as ort

    graph = onnx.load(str(path)).graph
    return {
        tensor.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(tensor))
        for tensor in graph.initializer
    }


def session(path: Path, threads: int, shared: dict[str, Any] | None = None) -> Any:
    """An ONNX Runtime CPU session on ``path``: ``threads`` intra-op threads (the serving
    process's budget), one inter-op thread, nodes run one after the other. ``shared``: its
    weights (``weights(path)``), used in place (no pre-packed copies of them); the values must
    outlive the session. No memory arena: what a forward pass allocates goes back after it.

    Create it in the process that runs it: ORT's thread pools do not survive fork."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3  # errors only: its warnings are about graph fusions
    if shared:
        options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in shared.items():
            options.add_initializer(name, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_inputs(model: Any, tokenizer: Any) -> tuple[str, ...]:
    """The inputs the graph takes: ids and mask, and token types when the model and its
    tokenizer both use them (BERT does, DistilBERT does not)."""
    takes = inspect.signature(model.forward).parameters
    names = getattr(tokenizer, "model_input_names", INPUTS)
    return tuple(n for n in INPUTS if n in takes and (n in names or n == "attention_mask"))


def export_onnx(
    folder: Path, *, output: Path | None = None, opset: int = OPSET, atol: float = 1e-4
) -> OnnxExport:
    """Write ``folder/model.onnx`` (or ``output``) from the transformers classifier in
    ``folder``, checked against torch; raises ArtifactError when it does not answer alike."""
    missing = [m for m in ("onnx", "onnxruntime") if _missing(m)]
    if missing:
        raise ImportError(
            f"exporting to ONNX needs {' and '.join(missing)}, not installed: pip install "
            "'modelworkers[onnx]'"
        )
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t0 = time.perf_counter()
    folder = Path(folder)
    output = Path(output) if output is not None else folder / ONNX_FILE
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    names = model_inputs(model, tokenizer)

    def encode(texts: list[str]) -> dict[str, Any]:
        enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        if "token_type_ids" in names and "token_type_ids" not in enc:
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
        return {n: enc[n] for n in names}

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(**dict(zip(names, tensors, strict=True))).logits

    # eval(): the exporter puts the wrapper, and so the model, back in the wrapper's mode
    wrapper = Logits().eval()
    sample = encode(TRACE_TEXTS)
    partial = output.with_name(output.name + ".partial")
    try:
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation notes about the exporter
            torch.onnx.export(
                wrapper,
                tuple(sample[n] for n in names),
                str(partial),
                input_names=list(names),
                output_names=["logits"],
                dynamic_axes={**axes, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        runner = session(partial, 1)
        diff = 0.0
        for batch in ([*CHECK_TEXTS, *TRACE_TEXTS], CHECK_TEXTS[:1], CHECK_TEXTS[2:3]):
            enc = encode(batch)
            with torch.no_grad():
                want = model(**enc).logits.float().numpy()
            feed = {n: enc[n].numpy().astype(np.int64) for n in names}
            got = runner.run(["logits"], feed)[0]
            diff = max(diff, float(np.abs(got - want).max()))
        del runner
        if diff > atol:
            raise ArtifactError(
                f"{output}: ONNX Runtime's logits differ from torch's by {diff:.2e} "
                f"(> {atol:g}); model.onnx not written"
            )
        os.replace(partial, output)  # a folder never holds a half-written model.onnx
    finally:
        partial.unlink(missing_ok=True)
    return OnnxExport(output, names, opset, diff, time.perf_counter() - t0)
