"""A small FastAPI front end for modelworkers: enqueue tasks by name, poll results, check health.

Copy this file into your web project. It imports nothing from modelworkers: like a web app in
any language, it knows only the task names, their JSON arguments and the Redis keys the workers
write. Set REDIS_URL, KEY_PREFIX and TASK_QUEUE to the workers' values, then run
``uvicorn examples.webapp:app``. See examples/README.md.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal

import redis
from celery import Celery
from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel

READY_STATES = {"SUCCESS", "FAILURE", "REVOKED"}


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


def create_app(
    redis_url: str | None = None, key_prefix: str | None = None, queue: str | None = None
) -> FastAPI:
    """Build the app; nothing connects to Redis until the first request."""
    url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = key_prefix or os.environ.get("KEY_PREFIX", "modelworkers")
    celery = Celery("webapp", broker=url, backend=url)
    celery.conf.update(
        task_default_queue=queue or os.environ.get("TASK_QUEUE", "modelworkers"),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Fail a request in seconds when Redis is down, instead of retrying for minutes.
        broker_connection_timeout=3,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        redis_socket_connect_timeout=3,
        result_backend_transport_options={"retry_policy": {"max_retries": 2, "interval_max": 1}},
    )
    store = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        celery.close()
        store.close()

    app = FastAPI(title="modelworkers example", lifespan=lifespan)

    def send(name: str, *args: Any, **kwargs: Any) -> dict[str, str]:
        """Enqueue ``name``; ``{"task_id"}``, or 503 when Redis is unreachable (kombu raises
        OperationalError, Celery's result consumer RuntimeError once its retries are spent)."""
        task_id = str(uuid.uuid4())
        try:
            celery.send_task(name, args=list(args), kwargs=kwargs, task_id=task_id)
        except (OperationalError, redis.RedisError, RuntimeError) as exc:
            raise HTTPException(503, f"cannot enqueue {name}: {exc.__cause__ or exc}") from None
        finally:
            # The Redis result backend subscribes to each sent task's channel and unsubscribes
            # only in .get(); clients poll GET /tasks/{id} instead, so drop it (celery#3808).
            with suppress(redis.RedisError, RuntimeError):
                celery.backend.result_consumer.cancel_for(task_id)
        return {"task_id": task_id}

    def task_view(task_id: str) -> dict[str, Any]:
        """The stored JSON result (key celery-task-meta-ID) as {task_id, state, result|error}."""
        try:
            raw = celery.backend.get(celery.backend.get_key_for_task(task_id))
        except redis.RedisError as exc:
            raise HTTPException(503, f"cannot reach Redis: {exc}") from None
        meta: dict[str, Any] = json.loads(raw) if raw else {"status": "PENDING"}
        view: dict[str, Any] = {"task_id": task_id, "state": meta["status"]}
        if meta["status"] == "SUCCESS":
            view["result"] = meta["result"]
        elif meta["status"] == "FAILURE":
            stored = meta.get("result") or {}  # {"exc_type", "exc_message": [message], ...}
            args = stored.get("exc_message") or [""]
            message = args[0] if isinstance(args, list) else args
            view["error"] = {"type": stored.get("exc_type", "Exception"), "message": str(message)}
        return view

    @app.post("/sentiment", status_code=202)
    def sentiment(body: Text) -> dict[str, str]:
        return send("sentiment.analyze", body.text)

    @app.post("/sentiment/batch", status_code=202)
    def sentiment_batch(body: Texts) -> dict[str, str]:
        return send("sentiment.analyze_batch", body.texts)

    @app.post("/forecast", status_code=202)
    def forecast(body: ForecastRequest) -> dict[str, str]:
        series = body.series.model_dump(exclude_none=True)
        if body.method == "arima":
            return send("forecast.arima", series, body.horizon, order=list(body.order))
        return send("forecast.prophet", series, body.horizon, frequency=body.frequency)

    @app.get("/tasks/{task_id}")
    def task(task_id: str) -> dict[str, Any]:
        return task_view(task_id)

    @app.post("/sentiment/sync")
    def sentiment_sync(body: Text, timeout: float = Query(10.0, gt=0, le=60)) -> dict[str, Any]:
        """Enqueue sentiment.analyze and wait up to ``timeout`` s: the result, 422 or 504."""
        task_id = send("sentiment.analyze", body.text)["task_id"]
        deadline = time.monotonic() + timeout
        while (view := task_view(task_id))["state"] not in READY_STATES:
            if time.monotonic() > deadline:
                raise HTTPException(504, {"task_id": task_id, "state": view["state"]})
            time.sleep(0.05)
        if view["state"] == "SUCCESS":
            result: dict[str, Any] = view["result"]
            return result
        status = 422 if view.get("error", {}).get("type") == "InvalidInput" else 502
        raise HTTPException(status, view.get("error") or view)

    @app.get("/health")
    def health() -> JSONResponse:
        """Ready when at least one worker process published a snapshot and all are ready."""
        try:
            keys = list(store.scan_iter(match=f"{prefix}:proc:*", count=500))
            snaps = [json.loads(raw) for raw in (store.mget(keys) if keys else []) if raw]
        except redis.RedisError as exc:
            return JSONResponse({"ready": False, "error": f"cannot reach Redis: {exc}"}, 503)
        models: dict[str, dict[str, Any]] = {}
        reasons: list[dict[str, Any]] = []
        for snap in snaps:
            if not snap.get("ready"):
                who = {"node": snap.get("node"), "pid": snap.get("pid")}
                reasons.append({**who, "reasons": snap.get("not_ready_reasons", [])})
            for name, meta in snap.get("models", {}).items():
                agg = models.setdefault(name, {"ready_in": 0, "versions": {}})
                if meta.get("status") == "READY":
                    agg["ready_in"] += 1
                    agg["versions"][meta["version"]] = agg["versions"].get(meta["version"], 0) + 1
        if not snaps:
            reasons.append({"reasons": [f"no worker process has published {prefix}:proc:*"]})
        body: dict[str, Any] = {"ready": not reasons, "processes": len(snaps), "models": models}
        if reasons:
            body["not_ready"] = reasons
        return JSONResponse(body, 503 if reasons else 200)

    return app


app = create_app()
