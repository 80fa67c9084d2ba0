"""scikit-learn estimators / pipelines saved with joblib (unpickled only after a sha256 match)."""

from __future__ import annotations

from typing import Any

from shared import schemas
from shared.families.base import Model
from shared.manifest import read_joblib, verify_artifact


class SklearnPipeline(Model):
    """A fitted estimator with ``predict``; clustering.assign uses it to label rows."""

    _estimator: Any = None
    family = "sklearn"

    @classmethod
    def preimport(cls) -> None:
        import joblib  # noqa: F401
        import sklearn.cluster
        import sklearn.pipeline
        import sklearn.preprocessing  # noqa: F401

    def load(self) -> None:
        import warnings

        import numpy as np

        # Pipelines fitted on a DataFrame warn on every plain-array call; rows are positional.
        warnings.filterwarnings("ignore", message="X does not have valid feature names")

        path = verify_artifact(self.spec)  # never unpickle an unverified file
        self._estimator = read_joblib(self.spec, path)
        self._np = np
        self.n_features = int(getattr(self._estimator, "n_features_in_", 0)) or len(
            self.spec.options.get("features", [])
        )
        self.features = list(self.spec.options.get("features", []))

    def warmup(self) -> None:
        if self.n_features:
            self.labels([[0.0] * self.n_features])

    def predict(self, rows: Any) -> Any:
        """``{"labels": [...]}``: one integer label per row."""
        return {"labels": self.labels(rows)}

    def labels(self, rows: list[list[float]]) -> list[int]:
        """Integer labels, one per row."""
        x = self._np.asarray(rows, dtype=float)
        return [int(v) for v in self._estimator.predict(x)]

    def validate(self, inputs: Any) -> Any:
        """``models.predict`` inputs: rows of ``n_features`` numbers (``{"labels"}`` answers)."""
        return schemas.row_inputs(
            inputs, width=self.n_features, max_rows=int(self.option("max_rows", 10_000))
        )

    def example(self) -> Any:
        return [[0.0] * self.n_features] if self.n_features else None

    def memory_bytes(self) -> int | None:
        """The fitted estimator's size: its arrays and Python objects, counted once each (a
        measure that other threads' allocations during the load cannot skew). None, so the
        registry measures the load's growth instead, for a graph too large to walk."""
        return None if self._estimator is None else deep_size(self._estimator)

    def unload(self) -> None:
        self._estimator = None

    def describe(self) -> dict[str, Any]:
        return {"n_features": self.n_features, "features": self.features}


def deep_size(root: Any, limit: int = 200_000) -> int | None:
    """Bytes held by ``root``: numpy arrays by their buffers (a view counts its base once), other
    objects by ``sys.getsizeof`` and their contents; None past ``limit`` objects."""
    import sys
    import types

    import numpy as np

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if isinstance(obj, np.ndarray):
            while isinstance(obj.base, np.ndarray):
                obj = obj.base
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if len(seen) > limit:
            return None
        if isinstance(obj, np.ndarray):
            total += obj.nbytes + sys.getsizeof(np.empty(0))
            if obj.dtype == object:
                stack.extend(obj.ravel().tolist())
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


def fit_kmeans(rows: list[list[float]], n_clusters: int, *, seed: int = 0) -> dict[str, Any]:
    """Fit KMeans on ``rows`` (what clustering.fit serves); deterministic for a given seed."""
    import warnings

    import numpy as np
    from sklearn.cluster import KMeans

    x = np.asarray(rows, dtype=float)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # overflow / convergence chatter: checked just below
        km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(x)
    if not (np.isfinite(km.inertia_) and np.isfinite(km.cluster_centers_).all()):
        raise ValueError("the fit overflowed (values too large): inertia is not finite")
    return {
        "labels": [int(v) for v in km.labels_],
        "centers": km.cluster_centers_.tolist(),
        "inertia": float(km.inertia_),
    }
