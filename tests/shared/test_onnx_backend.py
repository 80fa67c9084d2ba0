"""The transformers family on ONNX Runtime (option ``backend``): every transformers version of the
repository answers as on torch (same labels, scores within 1e-4); the choice of backend and its
errors; the export (CLI and build script) from a model folder made here; fork safety."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import cpu
from shared.errors import ArtifactError, ManifestError
from shared.families.base import ModelContext
from shared.families.transformers_onnx import ONNX_FILE, export_onnx
from shared.families.transformers_sentiment import TransformersSentiment, choose_backend
from shared.manifest import ModelSpec, artifact_sha256, verify_artifact
from shared.registry import ModelRegistry
from shared.repository import load_repository
from tests.conftest import REPOSITORY

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4

# tests/tasks/test_contract.py's texts, then edge cases
CONTRACT = [
    "An absolute delight, I loved it.",
    "Dreadful, boring and far too long.",
    "This is wonderful, great and amazing.",
    "Terrible, awful and horrible.",
    "good",
    "bad movie",
    "I will never buy this again",
    "superb acting",
    "meh",
    "a lonely sailor sets out across the pacific to find his brother.",
    "a witty, moving and beautifully acted film.",
]
LONG = "an utterly wonderful, moving and beautifully acted film that goes on and on " * 30
EDGES = ["", " ", "!!!", "a", "ok", LONG, "\U0001f600 \u00e9t\u00e9 na\u00efve caf\u00e9"]


def transformers_specs() -> list[ModelSpec]:
    return [s for s in load_repository(REPOSITORY).specs if s.family == "transformers"]


def with_options(spec: ModelSpec, **options: Any) -> ModelSpec:
    return spec.model_copy(update={"options": {**spec.options, **options}})


def loaded(
    spec: ModelSpec, backend: str, threads: int = 1, **options: Any
) -> TransformersSentiment:
    model = TransformersSentiment(
        with_options(spec, backend=backend, **options), ModelContext(device="cpu", threads=threads)
    )
    model.load()
    return model


def assert_alike(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [label for label, _ in got] == [label for label, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert abs(a - b) <= TOLERANCE, (a, b)


@pytest.fixture(scope="module", params=transformers_specs(), ids=lambda s: s.key)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    spec = request.param
    torch_model, onnx_model = loaded(spec, "torch"), loaded(spec, "onnx")
    yield torch_model, onnx_model
    torch_model.unload()
    onnx_model.unload()


def test_the_repository_ships_model_onnx_for_every_transformers_version() -> None:
    specs = transformers_specs()
    assert {s.key for s in specs} >= {"sentiment@1.0.0", "sentiment@1.1.0", "subjectivity@1.0.0"}
    for spec in specs:
        assert (Path(spec.location) / ONNX_FILE).is_file()
        verify_artifact(spec)  # the sha256 in the model file covers model.onnx


def test_onnx_answers_like_torch_one_text_at_a_time(pair: tuple[Any, Any]) -> None:
    torch_model, onnx_model = pair
    assert (torch_model.backend, onnx_model.backend) == ("torch", "onnx")
    for text in CONTRACT + EDGES:
        assert_alike(onnx_model.classify([text]), torch_model.classify([text]))


def test_onnx_answers_like_torch_on_a_batch_of_mixed_lengths(pair: tuple[Any, Any]) -> None:
    """Length-sorted passes (the CPU default) and one padded pass (pad_ratio 0) alike."""
    torch_model, onnx_model = pair
    batch = CONTRACT + EDGES
    assert_alike(onnx_model.classify(batch), torch_model.classify(batch))
    for model in pair:
        model.pad_ratio = 0.0
    try:
        assert_alike(onnx_model.classify(batch), torch_model.classify(batch))
    finally:
        for model in pair:
            model.pad_ratio = 1.25


def test_a_long_text_is_truncated_at_max_length_on_both(pair: tuple[Any, Any]) -> None:
    torch_model, onnx_model = pair
    ids = onnx_model._tokenizer([LONG], truncation=True, max_length=onnx_model.max_length)
    assert len(ids["input_ids"][0]) == onnx_model.max_length == 128
    assert len(onnx_model._tokenizer([LONG])["input_ids"][0]) > 128  # so it was cut
    assert_alike(onnx_model.classify([LONG, "ok"]), torch_model.classify([LONG, "ok"]))


def test_describe_names_the_backend_and_its_threads(pair: tuple[Any, Any]) -> None:
    torch_model, onnx_model = pair
    assert torch_model.describe()["backend"] == "torch"
    facts = onnx_model.describe()
    assert facts["backend"] == "onnx" and facts["onnx_threads"] == 1
    assert facts["onnx_shared_weights"] is True
    assert onnx_model.memory_bytes() is None  # one thread: the session holds the weights
    two = loaded(onnx_model.spec, "onnx", 2)  # read at load, for every process's session
    assert two.describe()["onnx_threads"] == 2 and two.describe()["onnx_shared_weights"] is True
    size = (Path(onnx_model.spec.location) / ONNX_FILE).stat().st_size
    assert two.memory_bytes() == pytest.approx(size, rel=0.05)
    two.unload()
    assert facts["labels"] == torch_model.describe()["labels"]


def test_auto_runs_onnx_on_a_cpu_when_the_folder_has_model_onnx_else_torch(
    tmp_path: Path,
) -> None:
    spec = load_repository(REPOSITORY).get("sentiment")
    assert loaded(spec, "auto").backend == "onnx"
    copy = tmp_path / "1.0.0"
    shutil.copytree(spec.location, copy)
    (copy / ONNX_FILE).unlink()
    plain = spec.model_copy(update={"location": str(copy), "sha256": artifact_sha256(copy)})
    assert loaded(plain, "auto").backend == "torch"
    # on CUDA auto is torch whatever the folder holds (no GPU needed to decide)
    assert choose_backend("auto", "cuda", Path(spec.location)) == "torch"


def test_onnx_prepack_gives_each_session_its_own_weights_and_the_same_answers() -> None:
    spec = load_repository(REPOSITORY).get("sentiment")
    shared, own = loaded(spec, "onnx", 2), loaded(spec, "onnx", 2, onnx_prepack=True)
    assert shared.describe()["onnx_shared_weights"] is True and shared.memory_bytes()
    assert own.describe()["onnx_shared_weights"] is False and own.memory_bytes() is None
    assert_alike(own.classify(CONTRACT + EDGES), shared.classify(CONTRACT + EDGES))


def test_a_deployment_default_applies_unless_the_model_file_says() -> None:
    spec = load_repository(REPOSITORY).get("sentiment")
    context = ModelContext(device="cpu", threads=1, defaults={"backend": "torch"})
    model = TransformersSentiment(spec, context)
    model.load()
    assert model.backend == "torch"
    model = TransformersSentiment(with_options(spec, backend="onnx"), context)
    model.load()
    assert model.backend == "onnx"


def test_backend_choices_that_cannot_run_fail_with_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="'fast' is not one of auto, onnx, torch"):
        choose_backend("fast", "cpu", tmp_path)
    with pytest.raises(ManifestError, match=r"runs on the CPU .* device is .cuda."):
        choose_backend("onnx", "cuda", tmp_path)
    with pytest.raises(ArtifactError, match=r"model\.onnx, which does not exist.*export-onnx"):
        choose_backend("onnx", "cpu", tmp_path)


def test_without_the_onnx_extra_auto_runs_torch_and_onnx_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ONNX_FILE).write_bytes(b"a graph")
    assert choose_backend("auto", "cpu", tmp_path) == "onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    assert choose_backend("auto", "cpu", tmp_path) == "torch"
    with pytest.raises(ImportError, match=r"pip install 'modelworkers\[onnx\]'"):
        choose_backend("onnx", "cpu", tmp_path)


def test_explicit_onnx_without_model_onnx_fails_that_version_and_the_others_load(
    tmp_path: Path,
) -> None:
    """Through the registry: the version is FAILED with the file named, the rest READY."""
    repo = load_repository(REPOSITORY)
    copy = tmp_path / "1.0.0"
    shutil.copytree(repo.get("subjectivity").location, copy)
    (copy / ONNX_FILE).unlink()
    broken = with_options(repo.get("subjectivity"), backend="onnx").model_copy(
        update={"location": str(copy), "sha256": artifact_sha256(copy)}
    )
    registry = ModelRegistry(warmup=True)
    try:
        states = registry.load_all([broken, repo.get("sentiment")])
        assert states["subjectivity"].status == "FAILED"
        assert "ArtifactError" in (states["subjectivity"].error or "")
        assert f"{copy / ONNX_FILE}, which does not exist" in (states["subjectivity"].error or "")
        assert states["sentiment"].status == "READY"
        assert states["sentiment"].details["backend"] == "onnx"
        assert registry.get("sentiment").predict("a joyous film")["label"] == "positive"
    finally:
        registry.close()


def test_before_fork_drops_a_session_with_a_thread_pool_and_the_next_call_opens_one() -> None:
    model = loaded(load_repository(REPOSITORY).get("sentiment"), "onnx", 2)
    first = model._session
    want = model.classify(CONTRACT)
    model.before_fork()
    assert model._session is None
    assert_alike(model.classify(CONTRACT), want)
    assert model._session is not None and model._session is not first


def test_a_one_thread_session_is_kept_across_fork() -> None:
    model = loaded(load_repository(REPOSITORY).get("sentiment"), "onnx", 1)
    first = model._session
    model.before_fork()
    assert model._session is first and model.describe()["onnx_session_crosses_fork"] is True
    assert model.describe()["onnx_shared_weights"] is True


@pytest.mark.parametrize("borrowed", [1, 3])
def test_a_batch_on_borrowed_cores_answers_as_on_one(
    borrowed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-thread session with idle cores to borrow: a batch of 8 or more texts runs in parts
    side by side (here up to 4, more than some length groups have rows), with the same answers;
    a smaller batch stays on this thread."""
    model = loaded(load_repository(REPOSITORY).get("sentiment"), "onnx", 1)
    texts = CONTRACT + EDGES
    want = model.classify(texts)
    small = model.classify(CONTRACT[:3])
    monkeypatch.setattr(cpu, "borrowable", lambda: borrowed)
    assert_alike(model.classify(CONTRACT[:3]), small)
    assert model._lanes is None
    assert_alike(model.classify(texts), want)
    assert model._lanes is not None and model._lanes[:2] == (os.getpid(), borrowed + 1)
    model.unload()
    assert model._lanes is None


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread-shared", "two-threads-own"])
def test_a_forked_child_answers_alike_on_the_parents_session_or_its_own(threads: int) -> None:
    """The copy-on-write path: load (a session opened here), before_fork, fork; the child
    classifies on the parent's session (one thread: no thread pool to lose) or on a session of
    its own (two threads). The child leaves through os._exit, as billiard's pool processes do
    (onnxruntime's exit-time destructors would wait for a thread only the parent has).
    Bounded: the child is killed after 60 s."""
    model = loaded(load_repository(REPOSITORY).get("sentiment"), "onnx", threads)
    want = model.classify(CONTRACT)
    model.before_fork()
    inherited = model._session
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            answers = model.classify(CONTRACT)
            same = model._session is inherited
            os.write(write, json.dumps({"answers": answers, "same": same}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], 60)
        assert ready, "the forked child did not answer within 60 s"
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
        pid = 0
    finally:
        os.close(read)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    got = json.loads(data)
    assert_alike([(label, score) for label, score in got["answers"]], want)
    assert got["same"] is (threads == 1)  # the parent's session, or one of its own


# ---- export ----------------------------------------------------------------------------------
def tiny_classifier(folder: Path, kind: str) -> Path:
    """A seeded, random 2-layer classifier (BERT, or DistilBERT which takes no token types)
    with the sentiment model's tokenizer, saved as a transformers folder."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(0)
    source = load_repository(REPOSITORY).get("sentiment").location
    tokenizer = AutoTokenizer.from_pretrained(source)
    labels = {"id2label": {0: "negative", 1: "positive"}}
    model: Any
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            **labels,
        )
        model = BertForSequenceClassification(config)
    else:
        config = DistilBertConfig(
            vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64, **labels
        )
        model = DistilBertForSequenceClassification(config)
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_export_takes_token_types_only_when_the_model_does(tmp_path: Path) -> None:
    bert = export_onnx(tiny_classifier(tmp_path / "bert", "bert"))
    distil = export_onnx(tiny_classifier(tmp_path / "distil", "distil"))
    assert bert.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert distil.inputs == ("input_ids", "attention_mask")
    assert bert.opset == 17 and bert.max_abs_diff <= TOLERANCE
    for folder in (tmp_path / "bert", tmp_path / "distil"):
        assert not list(folder.glob("*.partial"))
        spec = ModelSpec(
            name="tiny",
            family="transformers",
            path=folder.name,
            sha256=artifact_sha256(folder),
            location=str(folder),
        )
        assert_alike(
            loaded(spec, "onnx").classify(CONTRACT + EDGES),
            loaded(spec, "torch").classify(CONTRACT + EDGES),
        )


@pytest.mark.slow
def test_models_export_onnx_writes_a_loadable_file_and_updates_the_model_file(
    tmp_path: Path,
) -> None:
    """The CLI on a folder of a repository made here: model.onnx appears, the version's sha256
    is the folder's new one (the file's comments kept), and the worker's path loads it."""
    repo = tmp_path / "repo"
    folder = tiny_classifier(repo / "tiny" / "1.0.0", "bert")
    (repo / "tiny" / "model.toml").write_text(
        "# my comment\n"
        'family = "transformers"\n\n[options]\nbackend = "onnx"\n\n'
        f'[[versions]]\nversion = "1.0.0"\npath = "1.0.0"\nsha256 = "{artifact_sha256(folder)}"\n'
    )
    env = {**os.environ, "MODELWORKERS_MODEL_REPOSITORY": str(repo), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "workers.cli", "models", "export-onnx", str(folder)]
    done = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert f"wrote {folder / ONNX_FILE}" in done.stdout
    assert "updated the sha256 of tiny@1.0.0" in done.stdout
    assert (repo / "tiny" / "model.toml").read_text().startswith("# my comment\n")
    spec = load_repository(repo).get("tiny")
    assert spec.sha256 == artifact_sha256(folder)
    registry = ModelRegistry(warmup=True)
    try:
        assert registry.load_all([spec])["tiny"].status == "READY"
        assert registry.metadata("tiny").details["backend"] == "onnx"
    finally:
        registry.close()
    # not a transformers folder: refused, nothing written
    bad = subprocess.run(
        [*cli[:-1], str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "not a transformers model folder" in bad.stderr


@pytest.mark.slow
def test_build_models_onnx_only_exports_into_a_repository_built_elsewhere(
    tmp_path: Path,
) -> None:
    """scripts/build_models.py --onnx-only on a copy of the built-in sentiment model without
    its model.onnx: the file is written again, byte for byte, and the model file's sha256
    matches the folder (the export is deterministic)."""
    out = tmp_path / "models"
    shutil.copytree(REPOSITORY / "sentiment", out / "sentiment")
    for version in ("1.0.0", "1.1.0"):
        (out / "sentiment" / version / ONNX_FILE).unlink()
    script = [sys.executable, "scripts/build_models.py", "--onnx-only", "--only", "sentiment"]
    done = subprocess.run(
        [*script, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for version in ("1.0.0", "1.1.0"):
        written = (out / "sentiment" / version / ONNX_FILE).read_bytes()
        assert written == (REPOSITORY / "sentiment" / version / ONNX_FILE).read_bytes()
    spec = load_repository(out).get("sentiment")
    assert verify_artifact(spec)
    assert spec.sha256 == load_repository(REPOSITORY).get("sentiment").sha256
    assert loaded(spec, "onnx").classify(["a joyous film"])[0][0] == "positive"
