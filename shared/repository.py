"""The model repository: a folder the user owns, one folder per model, each with a model file.

::

    models/                      MODEL_REPOSITORY
      sentiment/
        model.toml               the model file (below)
        1.0.0/                   the artifact of version 1.0.0 (a folder or a file)
        1.1.0/
      co2_prophet/
        model.toml
        1.0.0.json

A model file (``model.toml``)::

    family = "transformers"        # a registered family (modelworkers.families entry point)
    # implementation = "my_pkg.models:Regressor"   # or a class of your own, instead of family
    required = false               # the process is not ready while a required model is not
    lazy = false                   # true: loaded on first use instead of at process start
    fallback = "textblob"          # a model that answers when this one cannot
    queue = ""                     # route this model's tasks to this queue ("" = TASK_QUEUE)
    default_version = "1.0.0"      # which version loads at start (default: the first listed)

    [options]                      # family options, for every version
    max_length = 128

    [[versions]]
    version = "1.0.0"
    path = "1.0.0"                 # relative to this folder, inside it
    sha256 = "..."                 # `modelworkers models hash PATH`

    [[versions]]
    version = "1.1.0"
    path = "1.1.0"
    sha256 = "..."
    [versions.options]             # options of this version only (override the ones above)

    [split]                        # optional: serve several versions at start, by weight
    "1.0.0" = 90                   # (the fleet's state in Redis, set by `modelworkers split`,
    "1.1.0" = 10                   # takes precedence)


Discovery reads ``*/model.toml`` one level below the repository and nothing else; the check for
artifacts no model file lists looks only inside each model's own folder. A malformed model file is
reported with the folder's name and skipped; it never stops the other models. Finding models (this
module) is separate from loading them (``shared.registry``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ManifestError
from shared.manifest import (
    ARTIFACT_SUFFIXES,
    Manifest,
    ModelSpec,
    apply_overrides,
    artifact_sha256,
)

MODEL_FILE = "model.toml"
SKIPPED_FOLDERS = {"cache", "__pycache__"}


class VersionEntry(BaseModel):
    """One ``[[versions]]`` table of a model file."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=r"^[A-Za-z0-9_.+-]{1,32}$")
    path: str = ""
    sha256: str = ""
    options: dict[str, Any] = Field(default_factory=dict)


class ModelFile(BaseModel):
    """A parsed ``model.toml``: one model and its versions."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None  # default: the folder's name
    family: str = ""
    implementation: str = ""
    required: bool = True
    lazy: bool = False
    fallback: str = ""
    queue: str = Field("", pattern=r"^[A-Za-z0-9_.:-]{0,64}$")
    default_version: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    versions: list[VersionEntry] = Field(default_factory=list)
    split: dict[str, int] = Field(default_factory=dict)  # version -> share of requests at start


def read_model_file(folder: Path) -> ModelFile:
    """Parse ``folder/model.toml``; raises ManifestError naming what is wrong."""
    path = folder / MODEL_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read: {exc}") from exc
    try:
        model = ModelFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise ManifestError(f"{where}: {first['msg']}") from None
    if not model.family and not model.implementation:
        raise ManifestError("family or implementation: one of them is required")
    if not model.versions:
        raise ManifestError("versions: at least one [[versions]] table is required")
    listed = [v.version for v in model.versions]
    if len(set(listed)) != len(listed):
        raise ManifestError(f"versions: a version is listed twice ({', '.join(listed)})")
    if model.default_version is not None and model.default_version not in listed:
        raise ManifestError(
            f"default_version: {model.default_version!r} is not one of the versions listed "
            f"({', '.join(listed)})"
        )
    for version, weight in model.split.items():
        if version not in listed:
            raise ManifestError(f"split: {version!r} is not one of the versions listed")
        if weight < 0:
            raise ManifestError(f"split: the weight of {version!r} is negative")
    if model.split and sum(model.split.values()) <= 0:
        raise ManifestError("split: at least one weight must be above 0")
    return model


def specs_of(folder: Path, model: ModelFile, root: Path) -> list[ModelSpec]:
    """The ModelSpecs of a model file: one per version, paths relative to the repository."""
    name = model.name or folder.name
    default = model.default_version or (
        max(model.split, key=lambda v: model.split[v]) if model.split else model.versions[0].version
    )
    specs = []
    for entry in model.versions:
        relative = (folder.relative_to(root) / entry.path).as_posix() if entry.path else ""
        spec = ModelSpec(
            name=name,
            # informational when the model names its class: the class's name
            family=model.family or model.implementation.rsplit(":", 1)[-1],
            implementation=model.implementation,
            path=relative,
            version=entry.version,
            sha256=entry.sha256,
            required=model.required,
            lazy=model.lazy,
            fallback=model.fallback,
            active=entry.version == default,
            queue=model.queue,
            weight=model.split.get(entry.version) if model.split else None,
            options={**model.options, **entry.options},
        )

        if entry.path:
            inside = (folder / entry.path).resolve()
            if folder.resolve() not in inside.parents and inside != folder.resolve():
                raise ManifestError(f"versions: path {entry.path!r} is outside the model folder")
            spec = spec.model_copy(update={"location": str(inside)})
        specs.append(spec)
    return specs


def unlisted_in(folder: Path, specs: list[ModelSpec], root: Path) -> list[str]:
    """Artifact-like files in a model's own folder that none of its versions names."""
    listed = [Path(s.location) for s in specs if s.location]
    found = []
    for candidate in sorted(folder.rglob("*")):
        if candidate.is_file() and candidate.suffix in ARTIFACT_SUFFIXES:
            resolved = candidate.resolve()
            if not any(resolved == p or p in resolved.parents for p in listed):
                found.append(candidate.relative_to(root).as_posix())
    return found


def model_folders(root: Path) -> list[Path]:
    """The folders of the repository that hold a model file (one level down, nothing deeper)."""
    if not root.is_dir():
        raise ManifestError(f"model repository {root} is not a folder")
    return [
        child
        for child in sorted(root.iterdir())
        if child.is_dir()
        and not child.name.startswith(".")
        and child.name not in SKIPPED_FOLDERS
        and (child / MODEL_FILE).is_file()
    ]


def load_repository(root: Path, *, overrides: dict[str, str] | None = None) -> Manifest:
    """Every model of the repository at ``root``; bad model files land in ``problems``."""
    manifest = Manifest(path=root)
    names: dict[str, str] = {}
    for folder in model_folders(root):
        try:
            specs = specs_of(folder, read_model_file(folder), root)
        except (ManifestError, ValidationError) as exc:
            manifest.problems[folder.name] = str(exc)
            continue
        name = specs[0].name
        if name in names:
            manifest.problems[folder.name] = f"name {name!r} is already used by {names[name]}/"
            continue
        names[name] = folder.name
        manifest.specs.extend(specs)
        manifest.unlisted.extend(unlisted_in(folder, specs, root))
    apply_overrides(manifest, overrides)
    return manifest


def _toml(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _toml(key)


def dump_model_file(model: ModelFile, *, header: str = "") -> str:
    """``model`` as the text of a model.toml (defaults left out; ``header`` as comments)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    fields = model.model_dump(exclude={"options", "versions"}, exclude_defaults=True)
    lines += [f"{key} = {_toml(value)}" for key, value in fields.items()]
    if model.options:
        lines += ["", "[options]"] + [f"{_key(k)} = {_toml(v)}" for k, v in model.options.items()]
    for entry in model.versions:
        lines += ["", "[[versions]]"]
        lines += [
            f"{key} = {_toml(value)}"
            for key, value in entry.model_dump(exclude={"options"}).items()
            if value != "" or key not in ("path", "sha256")
        ]
        if entry.options:
            lines += ["[versions.options]"] + [
                f"{_key(k)} = {_toml(v)}" for k, v in entry.options.items()
            ]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_model_file(folder: Path, model: ModelFile, *, header: str = "") -> Path:
    """Write ``folder/model.toml`` (creating the folder), checked by reading it back."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    path.write_text(dump_model_file(model, header=header), encoding="utf-8")
    read_model_file(folder)  # what we wrote must be what a worker reads
    return path


def update_sha256(root: Path, artifact: Path) -> list[str]:
    """Give every version of the repository at ``root`` whose path is ``artifact`` the
    artifact's sha256 as it is now (after a file was added to a version's folder); returns
    ``NAME@VERSION`` of each version updated. Only the old hash is replaced in the model file's
    text, so its comments stay (a version listed without a hash: the file is rewritten)."""
    target, updated = artifact.resolve(), []
    for folder in model_folders(root):
        try:
            model = read_model_file(folder)
        except ManifestError:
            continue
        for entry in model.versions:
            if not entry.path or (folder / entry.path).resolve() != target:
                continue
            digest = artifact_sha256(target)
            path = folder / MODEL_FILE
            text = path.read_text(encoding="utf-8")
            if entry.sha256 and text.count(entry.sha256) == 1:
                path.write_text(text.replace(entry.sha256, digest), encoding="utf-8")
                read_model_file(folder)
            else:
                versions = [
                    v if v is not entry else v.model_copy(update={"sha256": digest})
                    for v in model.versions
                ]
                write_model_file(folder, model.model_copy(update={"versions": versions}))
            updated.append(f"{model.name or folder.name}@{entry.version}")
    return updated
