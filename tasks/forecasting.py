"""forecast.prophet, forecast.arima (fit on the request's series) and forecast.predict."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from shared import schemas
from shared.families.arima_forecaster import ArimaForecaster, fit_arima
from shared.families.prophet_forecaster import ProphetForecaster, fit_prophet
from shared.registry import ModelRegistry
from tasks.base import ModelTask, call, limits, model_of, predict_one


def _library_version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


@shared_task(name="forecast.prophet", base=ModelTask, bind=True)
def prophet(self: ModelTask, series: Any, horizon: Any, frequency: Any = "D") -> dict[str, Any]:
    """Fit Prophet on ``series`` and forecast ``horizon`` periods of ``frequency``."""
    args = schemas.prophet_args(series, horizon, frequency, limits())
    ds = args.series.ds or []
    result = call(fit_prophet, ds, args.series.y, args.horizon, args.frequency, field="series")
    return {**result, "model": "prophet", "version": _library_version("prophet")}


@shared_task(name="forecast.arima", base=ModelTask, bind=True)
def arima(self: ModelTask, series: Any, horizon: Any, order: Any = (1, 1, 1)) -> dict[str, Any]:
    """Fit ARIMA(order) on ``series`` and forecast ``horizon`` steps."""
    order = list(order) if isinstance(order, tuple) else order
    args = schemas.arima_args(series, horizon, order, limits())
    p, d, q = args.order
    result = call(
        fit_arima, args.series.y, args.horizon, (p, d, q), ds=args.series.ds, field="series"
    )
    return {**result, "model": "arima", "version": _library_version("statsmodels")}


def predict_with(registry: ModelRegistry, name: str, horizon: int) -> dict[str, Any]:
    model_of(registry, name, (ProphetForecaster, ArimaForecaster), "model", "a forecaster")
    answer = predict_one(registry, name, horizon)
    return {**answer["outputs"], "model": answer["model"], "version": answer["version"]}


@shared_task(name="forecast.predict", base=ModelTask, bind=True)
def predict(self: ModelTask, model: Any, horizon: Any) -> dict[str, Any]:
    """Forecast ``horizon`` periods with a pre-fitted registered model."""
    args = schemas.predict_args(model, horizon, limits())
    return predict_with(self.registry, args.model, args.horizon)
