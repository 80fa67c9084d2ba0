"""Toy models the tests build: small but real, loaded by the production code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.manifest import artifact_sha256


def build_kmeans(path: Path, n_features: int = 3, k: int = 3) -> Path:
    """A StandardScaler + KMeans pipeline fitted on seeded random data, saved with joblib."""
    import joblib
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.random.default_rng(0).normal(size=(200, n_features))
    pipe = Pipeline(
        [("scale", StandardScaler()), ("kmeans", KMeans(n_clusters=k, n_init=2, random_state=0))]
    ).fit(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipe, path)
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def write_manifest(folder: Path, entries: list[dict[str, Any]], *, hash_paths: bool = True) -> Path:
    """Write ``folder/models.toml``; entries with a path and no sha256 get the real one."""
    lines = []
    for entry in entries:
        entry = dict(entry)
        options = entry.pop("options", None)
        if hash_paths and entry.get("path") and "sha256" not in entry:
            target = folder / entry["path"]
            if target.exists():
                entry["sha256"] = artifact_sha256(target)
        lines.append("[[model]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
        if options:
            lines.append("[model.options]")
            lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
        lines.append("")
    path = folder / "models.toml"
    path.write_text("\n".join(lines))
    return path
