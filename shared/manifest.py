"""What a worker serves: model specs, artifact checksums, and the earlier single-file format.

``ModelSpec`` is one (name, version) a worker may load; ``Manifest`` is every spec a deployment
lists, with the problems found while reading them. They come from the model repository
(``shared.repository``, one folder per model: the format to use) or from a single
``models.toml`` of the earlier format, which ``load_manifest`` still reads for this release
(MODEL_MANIFEST): one ``[[model]]`` table per (name, version)::


    [[model]]
    name = "customer_segments"      # what tasks ask for
    family = "sklearn"              # transformers | textblob | sklearn | prophet | arima
    path = "clustering/customer_segments-1.0.0.joblib"   # relative to the manifest's folder
    version = "1.0.0"
    sha256 = "..."                  # of the file, or of a directory (see artifact_sha256)
    required = true                 # a process is not ready while a required model is not READY
    lazy = false                    # true: loaded on first use instead of at process start
    fallback = ""                   # name of a model that answers when this one cannot
    active = true                   # which version of this name loads at start (default: first)
    [model.options]                 # family-specific options

A malformed entry is reported with its name and skipped; it never stops the other models.
Artifacts are only ever read from paths the manifest lists, after their sha256 matches.
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import ArtifactError, ManifestError

log = logging.getLogger("modelworkers.manifest")

ARTIFACT_SUFFIXES = (".joblib", ".pkl", ".pickle", ".json", ".safetensors", ".bin", ".onnx")


class ModelSpec(BaseModel):
    """One manifest entry: a named, versioned, checksummed model artifact."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    family: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # "package.module:Class": a Model subclass that serves this entry instead of the family's
    implementation: str = Field("", pattern=r"^([A-Za-z_][\w.]*:[A-Za-z_]\w*)?$")
    path: str = ""
    version: str = Field("1.0.0", pattern=r"^[A-Za-z0-9_.+-]{1,32}$")
    sha256: str = ""
    required: bool = True
    lazy: bool = False
    fallback: str = ""
    active: bool | None = None
    queue: str = ""  # the queue this model's tasks are routed to ("": the default queue)
    weight: int | None = None  # its share of requests at start, when the model file splits

    options: dict[str, Any] = Field(default_factory=dict)
    # Filled in by load_manifest: absolute artifact path; hub ids / overrides leave it as given.
    location: str = ""

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError("must be relative to the manifest folder, without '..'")
        return value

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class Manifest:
    """Parsed manifest: the valid entries, the rejected ones, and artifacts nobody listed."""

    path: Path
    specs: list[ModelSpec] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return sorted({s.name for s in self.specs})

    def versions(self, name: str) -> list[ModelSpec]:
        return [s for s in self.specs if s.name == name]

    def split(self, name: str) -> dict[str, int]:
        """The model file's split of ``name`` (version -> weight); {} when it serves one."""
        return {s.version: s.weight for s in self.versions(name) if s.weight is not None}

    def active(self) -> list[ModelSpec]:
        """One spec per name: the one marked active, else the first listed."""
        chosen: dict[str, ModelSpec] = {}
        for spec in self.specs:
            if spec.name not in chosen or (spec.active and not chosen[spec.name].active):
                chosen[spec.name] = spec
        return list(chosen.values())

    def get(self, name: str, version: str | None = None) -> ModelSpec:
        """The active spec of ``name``, or the one with ``version``; raises ModelNotFound."""
        from shared.errors import ModelNotFound

        candidates = self.versions(name)
        if not candidates:
            raise ModelNotFound(name, self.names)
        if version is None:
            return next(s for s in self.active() if s.name == name)
        for spec in candidates:
            if spec.version == version:
                return spec
        listed = ", ".join(s.version for s in candidates)
        raise ModelNotFound(
            f"model {name!r} has no version {version!r} in the manifest (listed: {listed})"
        )


def artifact_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory as ``relpath NUL sha256(file) LF`` over sorted files."""
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist")
    if not path.is_dir():
        return _file_sha256(path)
    outer = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        outer.update(f"{rel}\0{_file_sha256(file)}\n".encode())
    return outer.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(spec: ModelSpec) -> Path:
    """Return the artifact path after checking it exists and matches the manifest's sha256."""
    path = Path(spec.location)
    if not path.exists():
        raise ArtifactError(f"model {spec.name!r}: artifact {spec.path} is missing")
    if not spec.sha256:
        raise ArtifactError(f"model {spec.name!r}: manifest lists no sha256 for {spec.path}")
    actual = artifact_sha256(path)
    if actual != spec.sha256:
        raise ArtifactError(
            f"model {spec.name!r}: sha256 of {spec.path} is {actual[:12]}..., manifest says "
            f"{spec.sha256[:12]}... (truncated, corrupt or replaced artifact)"
        )
    return path


def read_joblib(spec: ModelSpec, path: Path) -> Any:
    """``joblib.load`` of a verified artifact; one that does not unpickle raises ArtifactError
    naming the model and the file (the library's own error is often a bare IndexError)."""
    import joblib

    try:
        return joblib.load(path)
    except Exception as exc:
        raise ArtifactError(
            f"model {spec.name!r}: {spec.path} could not be read as a joblib artifact "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def load_manifest(
    path: Path, *, overrides: dict[str, str] | None = None, default_version: str = "1.0.0"
) -> Manifest:
    """Parse the manifest at ``path``; bad entries land in ``problems``, never raise.

    ``default_version`` (MODEL_VERSION) is the version of entries that give none.
    ``overrides`` maps a model name to a replacement location (an HF directory or hub id) for
    its active entry; such an entry is marked ``sha256 = ""`` with ``options.trusted_override``.
    """
    manifest = Manifest(path=path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"manifest {path} cannot be read: {exc}") from exc
    entries = raw.get("model", [])
    if not isinstance(entries, list):
        raise ManifestError(f"manifest {path}: expected [[model]] tables")
    base = path.parent
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(entries):
        label = (
            str(entry.get("name", f"entry #{index + 1}"))
            if isinstance(entry, dict)
            else f"#{index + 1}"
        )
        if isinstance(entry, dict) and "version" not in entry:
            entry = {**entry, "version": default_version}
        try:
            spec = ModelSpec.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "entry"
            manifest.problems[label] = f"{where}: {first['msg']}"
            continue
        if (spec.name, spec.version) in seen:
            manifest.problems[label] = f"duplicate entry for version {spec.version}"
            continue
        seen.add((spec.name, spec.version))
        if spec.family != "textblob" and not spec.implementation and not spec.path:
            manifest.problems[label] = "path: required for family " + spec.family
            continue
        location = str((base / spec.path).resolve()) if spec.path else ""
        manifest.specs.append(spec.model_copy(update={"location": location}))
    apply_overrides(manifest, overrides)
    # Bounded: only the manifest's own folder and the folders that hold listed artifacts, one
    # level each (a folder that also holds virtual environments must not be walked).
    listed = {Path(s.location) for s in manifest.specs if s.location}
    folders = {base.resolve()} | {p.parent for p in listed if p.parent != p}
    for folder in sorted(folders):
        if not folder.is_dir() or base.resolve() not in (folder, *folder.parents):
            continue
        for candidate in sorted(folder.iterdir()):
            if candidate.is_file() and candidate.suffix in ARTIFACT_SUFFIXES:
                resolved = candidate.resolve()
                if not any(resolved == p or p in resolved.parents for p in listed):
                    manifest.unlisted.append(candidate.relative_to(base.resolve()).as_posix())
    return manifest


def apply_overrides(manifest: Manifest, overrides: dict[str, str] | None) -> None:
    """Point a model's active entry at a replacement location (an HF directory or hub id: the
    SENTIMENT_MODEL setting), marked ``sha256 = ""`` with ``options.trusted_override``; then
    record every fallback that names no model as a problem."""
    for name, target in (overrides or {}).items():
        for i, spec in enumerate(manifest.specs):
            if spec.name == name and spec in manifest.active():
                options = {**spec.options, "trusted_override": True}
                manifest.specs[i] = spec.model_copy(
                    update={
                        "location": target,
                        "sha256": "",
                        "options": options,
                        "version": spec.version + "+override",
                    }
                )
    known = {s.name for s in manifest.specs}
    for spec in list(manifest.specs):
        if spec.fallback and spec.fallback not in known:
            manifest.problems[spec.name] = f"fallback: {spec.fallback!r} is not in the manifest"


_warned: set[str] = set()


def manifest_from_settings(settings: Any) -> Manifest:
    """What this deployment serves, as every part of modelworkers reads it: the model repository
    (MODEL_REPOSITORY), or a single-file manifest of the earlier format (MODEL_MANIFEST, or a
    MODEL_REPOSITORY that names a .toml file), with the SENTIMENT_MODEL override."""
    from shared.repository import load_repository

    overrides = {"sentiment": settings.sentiment_model} if settings.sentiment_model else None
    legacy: Path | None = settings.model_manifest
    if legacy is None and Path(settings.model_repository).suffix == ".toml":
        legacy = Path(settings.model_repository)
    if legacy is None:
        return load_repository(Path(settings.model_repository), overrides=overrides)
    if str(legacy) not in _warned:
        _warned.add(str(legacy))
        log.warning(
            "%s is a single-file manifest (MODELWORKERS_MODEL_MANIFEST), kept working for this "
            "release: convert it to a model repository, one folder per model with a model.toml "
            "(docs/models.md, 'Converting a models.toml')",
            legacy,
        )
    return load_manifest(legacy, overrides=overrides, default_version=settings.model_version)
