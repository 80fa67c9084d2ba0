"""Prophet: pre-fitted models (JSON, via prophet.serialize) and fit-on-request forecasts."""

from __future__ import annotations

import threading
from typing import Any

from shared import schemas
from shared.families.base import Model
from shared.manifest import verify_artifact

# Prophet draws its uncertainty intervals from numpy's global RNG; seeding it per call makes a
# served forecast equal the same call made in-process. The lock keeps threads from interleaving.
_RNG_LOCK = threading.Lock()
SEED = 0


def _frame_to_result(frame: Any) -> dict[str, Any]:
    return {
        "ds": [d.isoformat() for d in frame["ds"].dt.to_pydatetime()],
        "yhat": [float(v) for v in frame["yhat"]],
        "yhat_lower": [float(v) for v in frame["yhat_lower"]],
        "yhat_upper": [float(v) for v in frame["yhat_upper"]],
    }


def _quiet() -> None:
    import logging

    for name in ("prophet", "cmdstanpy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("prophet.plot").setLevel(logging.CRITICAL)  # "Importing plotly failed"


class ProphetForecaster(Model):
    """A fitted Prophet model; ``forecast(h)`` continues it ``h`` steps past its history."""

    _model: Any = None
    family = "prophet"
    warm_before_fork = True  # numpy / pandas; Stan fits in a subprocess

    @classmethod
    def preimport(cls) -> None:
        _quiet()
        import prophet  # noqa: F401
        from prophet.serialize import model_from_json  # noqa: F401

        _quiet()

    def load(self) -> None:
        from prophet.serialize import model_from_json

        _quiet()
        path = verify_artifact(self.spec)
        self._model = model_from_json(path.read_text(encoding="utf-8"))
        self.frequency = str(self.spec.options.get("frequency", "D"))

    def warmup(self) -> None:
        # Forecast once, and fit once: the first fit in a process loads Stan's compiled model.
        self.forecast(1)
        days = [f"2020-01-{d:02d}" for d in range(1, 15)]
        fit_prophet(days, [float(d % 7) for d in range(14)], 1, "D")

    def forecast(self, horizon: int) -> dict[str, Any]:
        """ds / yhat / yhat_lower / yhat_upper for the next ``horizon`` periods."""
        import numpy as np

        future = self._model.make_future_dataframe(
            periods=horizon, freq=self.frequency, include_history=False
        )
        with _RNG_LOCK:
            np.random.seed(SEED)
            frame = self._model.predict(future)
        return _frame_to_result(frame)

    def validate(self, inputs: Any) -> Any:
        """``models.predict`` inputs: ``{"horizon": N}`` (answers as forecast.predict's)."""
        return schemas.horizon_inputs(inputs, max_horizon=int(self.option("max_horizon", 1_000)))

    def predict(self, inputs: Any) -> Any:
        return self.forecast(int(inputs))

    def example(self) -> Any:
        return {"horizon": 1}

    def unload(self) -> None:

        self._model = None

    def describe(self) -> dict[str, Any]:
        return {"frequency": self.frequency}


def fit_prophet(ds: list[str], y: list[float], horizon: int, frequency: str) -> dict[str, Any]:
    """Fit Prophet on (ds, y) and forecast ``horizon`` periods of ``frequency``."""
    import numpy as np
    import pandas as pd
    from prophet import Prophet

    _quiet()
    history = pd.DataFrame({"ds": pd.to_datetime(ds), "y": y})
    with _RNG_LOCK:
        np.random.seed(SEED)
        model = Prophet().fit(history)
        future = model.make_future_dataframe(periods=horizon, freq=frequency, include_history=False)
        frame = model.predict(future)
    return _frame_to_result(frame)
