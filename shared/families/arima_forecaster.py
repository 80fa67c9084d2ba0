"""ARIMA (statsmodels): pre-fitted results objects and fit-on-request forecasts."""

from __future__ import annotations

import warnings
from typing import Any

from shared import schemas
from shared.families.base import Model
from shared.manifest import read_joblib, verify_artifact

ALPHA = 0.2  # 80% interval, as Prophet's default interval_width


def _summary_to_result(frame: Any, dates: list[str] | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "yhat": [float(v) for v in frame["mean"]],
        "yhat_lower": [float(v) for v in frame["mean_ci_lower"]],
        "yhat_upper": [float(v) for v in frame["mean_ci_upper"]],
    }
    result["ds"] = dates
    return result


def _index_dates(index: Any) -> list[str] | None:
    import pandas as pd

    if isinstance(index, pd.DatetimeIndex):
        return [d.isoformat() for d in index.to_pydatetime()]
    return None


class ArimaForecaster(Model):
    """A fitted ``ARIMAResults``; ``forecast(h)`` continues its series."""

    _results: Any = None
    family = "arima"
    warm_before_fork = True  # numpy / pandas / statsmodels

    @classmethod
    def preimport(cls) -> None:
        import statsmodels.tsa.arima.model  # noqa: F401

    def load(self) -> None:
        path = verify_artifact(self.spec)  # never unpickle an unverified file
        self._results = read_joblib(self.spec, path)

    def warmup(self) -> None:
        self.forecast(1)

    def forecast(self, horizon: int) -> dict[str, Any]:
        """ds (when the model has dates) / yhat / yhat_lower / yhat_upper."""
        frame = self._results.get_forecast(horizon).summary_frame(alpha=ALPHA)
        return _summary_to_result(frame, _index_dates(frame.index))

    def validate(self, inputs: Any) -> Any:
        """``models.predict`` inputs: ``{"horizon": N}`` (answers as forecast.predict's)."""
        return schemas.horizon_inputs(inputs, max_horizon=int(self.option("max_horizon", 1_000)))

    def predict(self, inputs: Any) -> Any:
        return self.forecast(int(inputs))

    def example(self) -> Any:
        return {"horizon": 1}

    def unload(self) -> None:

        self._results = None

    def describe(self) -> dict[str, Any]:
        return {"order": list(self._results.model.order) if self._results is not None else None}


def fit_arima(
    y: list[float],
    horizon: int,
    order: tuple[int, int, int],
    *,
    ds: list[str] | None = None,
    frequency: str | None = None,
) -> dict[str, Any]:
    """Fit ARIMA(order) on ``y`` (dated when ``ds`` is given) and forecast ``horizon`` steps."""
    import pandas as pd
    from statsmodels.tsa.arima.model import ARIMA

    series: Any = pd.Series(y, dtype=float)
    if ds is not None:
        index = pd.DatetimeIndex(pd.to_datetime(ds))
        freq = frequency or pd.infer_freq(index)
        series.index = pd.DatetimeIndex(index, freq=freq) if freq else index
        if not freq:
            series = series.reset_index(drop=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter; the result still stands
        results = ARIMA(series, order=order).fit()
    frame = results.get_forecast(horizon).summary_frame(alpha=ALPHA)
    return _summary_to_result(frame, _index_dates(frame.index))
