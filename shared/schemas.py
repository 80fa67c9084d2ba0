"""Task input schemas, validated at the task boundary.

Every task argument is checked here before a model sees it. A failure raises
:class:`shared.errors.InvalidInput` whose message starts with the field's path
(``series.y[3]: Input should be a finite number``). Size limits come from the settings
(``MAX_TEXT_CHARS``, ``MAX_SERIES_POINTS``...), checked before any element is parsed so a
10 MB text or a 10-million-point series is refused in constant time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from shared.errors import InvalidInput


@dataclass(frozen=True)
class Limits:
    """Input size limits: the MAX_* / MIN_* settings of the same names (their defaults and
    meaning are in shared/settings.py and docs/tasks.md)."""

    max_text_chars: int
    max_batch_texts: int
    min_series_points: int
    max_series_points: int
    max_horizon: int
    max_rows: int
    max_clusters: int

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__})


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class Series(_Schema):
    ds: list[StrictStr] | None = None
    y: list[float]


class SentimentIn(_Schema):
    text: StrictStr


class SentimentBatchIn(_Schema):
    texts: list[StrictStr]


class ProphetIn(_Schema):
    series: Series
    horizon: StrictInt
    frequency: StrictStr = "D"


class ArimaIn(_Schema):
    series: Series
    horizon: StrictInt
    order: list[StrictInt] = Field(default_factory=lambda: [1, 1, 1])


class PredictIn(_Schema):
    model: StrictStr
    horizon: StrictInt


class AssignIn(_Schema):
    rows: list[list[float]]
    model: StrictStr = "customer_segments"


class FitIn(_Schema):
    rows: list[list[float]]
    n_clusters: StrictInt


S = TypeVar("S", bound=_Schema)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "arguments"


def _parse(schema: type[S], data: dict[str, Any], *, prefix: tuple[str, ...] = ()) -> S:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        err["loc"] = prefix + tuple(err["loc"])
        got = err.get("input")
        shown = (
            ""
            if isinstance(got, dict | list) or err["type"] == "missing"
            else f" (got {got!r:.40})"
        )
        msg = "unexpected argument" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidInput(_path(err["loc"]), f"{msg}{shown}") from None


def _check_size(field: str, value: Any, limit: int, what: str) -> None:
    if isinstance(value, list | str) and len(value) > limit:
        raise InvalidInput(field, f"{len(value):,} {what} is more than the limit of {limit:,}")


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def _check_text(field: str, text: str, limits: Limits) -> str:
    if not text.translate(_INVISIBLE).strip():  # whitespace or zero-width characters only
        raise InvalidInput(field, "must be a non-empty string")
    if len(text) > limits.max_text_chars:
        raise InvalidInput(
            field, f"{len(text):,} characters is more than the limit of {limits.max_text_chars:,}"
        )
    if "\x00" in text:
        raise InvalidInput(field, "must not contain NUL characters")
    return text


def sentiment_text(text: Any, limits: Limits) -> str:
    """Validate the ``text`` argument of sentiment.analyze."""
    if isinstance(text, str) and len(text) > limits.max_text_chars:
        _check_text("text", text, limits)
    return _check_text("text", _parse(SentimentIn, {"text": text}).text, limits)


def sentiment_texts(texts: Any, limits: Limits) -> list[str]:
    """Validate the ``texts`` argument of sentiment.analyze_batch."""
    _check_size("texts", texts, limits.max_batch_texts, "texts")
    if isinstance(texts, list):
        for i, t in enumerate(texts):
            if isinstance(t, str) and len(t) > limits.max_text_chars:
                _check_text(f"texts[{i}]", t, limits)
    parsed = _parse(SentimentBatchIn, {"texts": texts}).texts
    if not parsed:
        raise InvalidInput("texts", "must be a non-empty list of strings")
    return [_check_text(f"texts[{i}]", t, limits) for i, t in enumerate(parsed)]


def _horizon(horizon: int, limits: Limits) -> int:
    if horizon <= 0 or horizon > limits.max_horizon:
        raise InvalidInput("horizon", f"must be between 1 and {limits.max_horizon} (got {horizon})")
    return horizon


def _series(raw: Any, limits: Limits, *, dates_required: bool) -> Series:
    if isinstance(raw, dict):
        _check_size("series.y", raw.get("y"), limits.max_series_points, "points")
        _check_size("series.ds", raw.get("ds"), limits.max_series_points, "dates")
    series = _parse(Series, raw, prefix=("series",)) if isinstance(raw, dict) else None
    if series is None:
        raise InvalidInput("series", 'must be an object {"ds": [ISO dates], "y": [numbers]}')
    if len(series.y) < limits.min_series_points:
        raise InvalidInput(
            "series.y",
            f"{len(series.y)} points is fewer than the minimum of {limits.min_series_points}",
        )
    if series.ds is None:
        if dates_required:
            raise InvalidInput("series.ds", "is required (ISO dates, one per value of y)")
        return series
    if len(series.ds) != len(series.y):
        raise InvalidInput(
            "series.ds", f"has {len(series.ds)} dates but series.y has {len(series.y)} values"
        )
    _check_dates(series.ds)
    return series


def _check_dates(ds: list[str]) -> None:
    import pandas as pd

    try:
        parsed = pd.to_datetime(pd.Series(ds), format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        for i, d in enumerate(ds):  # find the first bad one to name it
            try:
                pd.Timestamp(d)
            except (ValueError, TypeError, OverflowError):
                raise InvalidInput(
                    f"series.ds[{i}]", f"is not an ISO date (got {d!r:.40})"
                ) from None
        raise InvalidInput("series.ds", "dates could not be parsed as ISO 8601") from None
    if parsed.isna().any():
        i = int(parsed.isna().to_numpy().argmax())
        raise InvalidInput(f"series.ds[{i}]", "is not an ISO date")
    if parsed.dt.tz is not None:
        raise InvalidInput("series.ds", "dates must not carry a time zone")
    if not parsed.is_monotonic_increasing or parsed.duplicated().any():
        raise InvalidInput("series.ds", "dates must be strictly increasing")


def _frequency(freq: str) -> str:
    import pandas as pd

    try:
        pd.tseries.frequencies.to_offset(freq)
    except (ValueError, TypeError):
        raise InvalidInput(
            "frequency", f"is not a pandas frequency like D, W, MS, h (got {freq!r:.20})"
        ) from None
    return freq


def prophet_args(series: Any, horizon: Any, frequency: Any, limits: Limits) -> ProphetIn:
    """Validate forecast.prophet(series, horizon, frequency)."""
    args = _parse(ProphetIn, {"series": {"y": []}, "horizon": horizon, "frequency": frequency})
    _horizon(args.horizon, limits)
    _frequency(args.frequency)
    return args.model_copy(update={"series": _series(series, limits, dates_required=True)})


def arima_args(series: Any, horizon: Any, order: Any, limits: Limits) -> ArimaIn:
    """Validate forecast.arima(series, horizon, order)."""
    args = _parse(ArimaIn, {"series": {"y": []}, "horizon": horizon, "order": order})
    _horizon(args.horizon, limits)
    if len(args.order) != 3:
        raise InvalidInput("order", f"must be [p, d, q] (got {len(args.order)} numbers)")
    p, d, q = args.order
    if not (0 <= p <= 5 and 0 <= d <= 2 and 0 <= q <= 5):
        raise InvalidInput("order", f"needs 0<=p<=5, 0<=d<=2, 0<=q<=5 (got {args.order})")
    checked = _series(series, limits, dates_required=False)
    if checked.ds is not None:
        import pandas as pd

        if pd.infer_freq(pd.DatetimeIndex(pd.to_datetime(checked.ds, format="ISO8601"))) is None:
            raise InvalidInput("series.ds", "dates must be evenly spaced (daily, monthly...)")
    return args.model_copy(update={"series": checked})


def predict_args(model: Any, horizon: Any, limits: Limits) -> PredictIn:
    """Validate forecast.predict(model, horizon)."""
    args = _parse(PredictIn, {"model": model, "horizon": horizon})
    _horizon(args.horizon, limits)
    return args


def _rows(rows: Any, limits: Limits) -> list[list[float]]:
    _check_size("rows", rows, limits.max_rows, "rows")
    parsed = _parse(AssignIn, {"rows": rows}).rows
    if not parsed:
        raise InvalidInput("rows", "must be a non-empty list of rows of numbers")
    width = len(parsed[0])
    if width == 0:
        raise InvalidInput("rows[0]", "must not be empty")
    for i, row in enumerate(parsed):
        if len(row) != width:
            raise InvalidInput(f"rows[{i}]", f"has {len(row)} values but rows[0] has {width}")
    return parsed


def assign_args(rows: Any, model: Any, limits: Limits) -> AssignIn:
    """Validate clustering.assign(rows, model); the width is checked against the model later."""
    name = _parse(AssignIn, {"rows": [], "model": model}).model
    return AssignIn(rows=_rows(rows, limits), model=name)


def fit_args(rows: Any, n_clusters: Any, limits: Limits) -> FitIn:
    """Validate clustering.fit(rows, n_clusters)."""
    k = _parse(FitIn, {"rows": [], "n_clusters": n_clusters}).n_clusters
    parsed = _rows(rows, limits)
    if not 2 <= k <= limits.max_clusters:
        raise InvalidInput("n_clusters", f"must be between 2 and {limits.max_clusters} (got {k})")
    if k > len(parsed):
        raise InvalidInput("n_clusters", f"{k} is more than the {len(parsed)} rows given")
    return FitIn(rows=parsed, n_clusters=k)


# ---- models.predict: the built-in families' inputs ---------------------------------------
class _TextOrTexts(_Schema):
    inputs: StrictStr | list[StrictStr]


def text_inputs(inputs: Any, *, max_chars: int, max_texts: int) -> str | list[str]:
    """A text classifier's ``inputs``: one text, or a non-empty list of texts."""
    limits = Limits(max_chars, max_texts, 0, 0, 0, 0, 0)
    if isinstance(inputs, list):
        _check_size("inputs", inputs, max_texts, "texts")
    if isinstance(inputs, str):
        return _check_text("inputs", inputs, limits)
    parsed = _parse(_TextOrTexts, {"inputs": inputs}).inputs
    if isinstance(parsed, str) or not parsed:
        raise InvalidInput("inputs", "must be a text or a non-empty list of texts")
    return [_check_text(f"inputs[{i}]", t, limits) for i, t in enumerate(parsed)]


class _Rows(_Schema):
    inputs: list[list[float]]


def row_inputs(inputs: Any, *, width: int, max_rows: int) -> list[list[float]]:
    """A tabular model's ``inputs``: rows of ``width`` finite numbers (0: any, but equal)."""
    _check_size("inputs", inputs, max_rows, "rows")
    rows = _parse(_Rows, {"inputs": inputs}).inputs
    if not rows:
        raise InvalidInput("inputs", "must be a non-empty list of rows of numbers")
    expected = width or len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != expected:
            raise InvalidInput(f"inputs[{i}]", f"has {len(row)} values, the model takes {expected}")
    return rows


class _Horizon(_Schema):
    horizon: StrictInt


def horizon_inputs(inputs: Any, *, max_horizon: int) -> int:
    """A forecaster's ``inputs``: ``{"horizon": N}``; returns N."""
    if not isinstance(inputs, dict):
        raise InvalidInput("inputs", 'must be an object {"horizon": N}')
    horizon = _parse(_Horizon, inputs, prefix=("inputs",)).horizon
    if not 1 <= horizon <= max_horizon:
        raise InvalidInput("inputs.horizon", f"must be between 1 and {max_horizon} (got {horizon})")
    return horizon


class ModelPredictIn(_Schema):
    model: StrictStr = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    version: StrictStr | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]{1,32}$")
    key: StrictStr | None = Field(None, max_length=256)


def predict_model_args(model: Any, version: Any, key: Any = None) -> ModelPredictIn:
    """Validate the ``model``, ``version`` and ``key`` arguments of models.predict."""
    return _parse(ModelPredictIn, {"model": model, "version": version, "key": key})
