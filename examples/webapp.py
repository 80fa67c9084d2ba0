"""A small FastAPI front end for modelworkers: enqueue jobs, poll them, wait for one, check health.

Copy this file into your web project. It talks to the workers through the project's Python
client (``workers.client.AsyncModelClient``): typed results, typed errors, each model's tasks
sent to its queue. The client needs the modelworkers package installed, but imports none of the
ML libraries. Set REDIS_URL (+ REDIS_PASSWORD), KEY_PREFIX and TASK_QUEUE to the workers' values,
then run ``uvicorn examples.webapp:app``. See examples/README.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from shared.errors import (
    InvalidInput,
    ModelNotFound,
    ModelWorkersError,
    RedisUnavailable,
    ResultTimeout,
    TaskFailed,
)
from shared.results import Prediction, Sentiment
from shared.state import fleet_summary
from workers.client import AsyncModelClient


class Text(BaseModel):
    text: str


class Texts(BaseModel):
    texts: list[str]


class Series(BaseModel):
    ds: list[str] | None = None
    y: list[float]


class ForecastRequest(BaseModel):
    series: Series
    horizon: int = 6
    frequency: str = "MS"
    method: Literal["prophet", "arima"] = "prophet"
    order: tuple[int, int, int] = (1, 1, 1)


class PredictRequest(BaseModel):
    inputs: Any
    version: str | None = None


def error_body(exc: ModelWorkersError) -> dict[str, str]:
    """``{"type", "message"}``: the worker's error type (``exc_type``) and its message."""
    kind = exc.exc_type if isinstance(exc, TaskFailed) and exc.exc_type else type(exc).__name__
    return {"type": kind, "message": exc.message}


def http_error(exc: ModelWorkersError) -> HTTPException:
    """The HTTP answer to a failed synchronous call."""
    if isinstance(exc, ResultTimeout):  # the job is still queued or running: poll it
        return HTTPException(504, {"task_id": exc.task_id, "state": exc.state})
    if isinstance(exc, RedisUnavailable):
        return HTTPException(503, str(exc))
    status = {InvalidInput: 422, ModelNotFound: 404}.get(type(exc), 502)
    return HTTPException(status, error_body(exc))


def create_app(
    redis_url: str | None = None, key_prefix: str | None = None, queue: str | None = None
) -> FastAPI:
    """Build the app; nothing connects to Redis until the first request. Arguments left out
    come from the environment, as for the workers."""
    client = AsyncModelClient(redis_url, queue=queue, key_prefix=key_prefix)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="modelworkers example", lifespan=lifespan)

    async def send(name: str, *args: Any, **kwargs: Any) -> dict[str, str]:
        """Enqueue ``name``; ``{"task_id"}``, or 503 when Redis is unreachable."""
        try:
            return {"task_id": await client.send(name, *args, **kwargs)}
        except RedisUnavailable as exc:
            raise HTTPException(503, str(exc)) from None

    @app.post("/sentiment", status_code=202)
    async def sentiment(body: Text) -> dict[str, str]:
        return await send("sentiment.analyze", body.text)

    @app.post("/sentiment/batch", status_code=202)
    async def sentiment_batch(body: Texts) -> dict[str, str]:
        return await send("sentiment.analyze_batch", body.texts)

    @app.post("/forecast", status_code=202)
    async def forecast(body: ForecastRequest) -> dict[str, str]:
        series = body.series.model_dump(exclude_none=True)
        if body.method == "arima":
            return await send("forecast.arima", series, body.horizon, order=list(body.order))
        return await send("forecast.prophet", series, body.horizon, frequency=body.frequency)

    @app.get("/tasks/{task_id}")
    async def task(task_id: str) -> dict[str, Any]:
        """``{task_id, state}``, plus ``result`` (SUCCESS) or ``error`` (FAILURE)."""
        try:
            result = await client.result(task_id, timeout=0)  # one read, no wait
        except ResultTimeout as exc:  # not done: PENDING (or unknown id), STARTED
            return {"task_id": task_id, "state": exc.state}
        except RedisUnavailable as exc:
            raise HTTPException(503, str(exc)) from None
        except ModelWorkersError as exc:
            return {"task_id": task_id, "state": "FAILURE", "error": error_body(exc)}
        return {"task_id": task_id, "state": "SUCCESS", "result": result}

    @app.post("/sentiment/sync")
    async def sentiment_sync(body: Text, timeout: float = Query(10.0, gt=0, le=60)) -> Sentiment:
        """sentiment.analyze, waiting up to ``timeout`` s: the result, 422, 502, 503 or 504."""
        try:
            return await client.analyze(body.text, timeout=timeout)
        except ModelWorkersError as exc:
            raise http_error(exc) from None

    @app.post("/models/{model}/predict")
    async def predict(
        model: str, body: PredictRequest, timeout: float = Query(10.0, gt=0, le=60)
    ) -> Prediction:
        """models.predict for any model (sent to that model's queue), waiting up to
        ``timeout`` s: the prediction, 404 for an unknown model, 422, 502, 503 or 504."""
        try:
            return await client.predict(model, body.inputs, body.version, timeout=timeout)
        except ModelWorkersError as exc:
            raise http_error(exc) from None

    @app.get("/health")
    async def health() -> JSONResponse:
        """Ready when at least one worker process published a snapshot and all are ready."""
        try:
            snapshots = await client.snapshots()
        except RedisUnavailable as exc:
            return JSONResponse({"ready": False, "error": str(exc)}, 503)
        summary = fleet_summary(snapshots)
        body = summary.model_dump(mode="json")
        if not snapshots:
            reason = f"no worker process has published {client.key_prefix}:proc:*"
            body["not_ready"] = [{"node": None, "pid": None, "reasons": [reason]}]
        return JSONResponse(body, 200 if summary.ready else 503)

    return app


app = create_app()
