"""The bad-input catalogue through a real worker: every case fails with a typed error within a
bounded time, the worker stays healthy, and the next valid task succeeds."""

from __future__ import annotations

import time
from typing import Any

import pytest

from harness import WorkerProcess
from tests.tasks.test_contract import stored_error

pytestmark = pytest.mark.integration
DS = [f"2024-01-{d:02d}" for d in range(1, 25)]
Y = [float(d) for d in range(24)]
ROW = [10.0, 5.0, 300.0, 12.0]

# (task, args, kwargs, exc_type, the message must contain)
CASES: list[tuple[str, list[Any], dict[str, Any], str, str]] = [
    ("sentiment.analyze", ["x" * 10_000_000], {}, "InvalidInput", "text: 10,000,000 characters"),
    ("sentiment.analyze", [None], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", [{"text": "nested"}], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", [["a", ["b"]]], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", ["\u200b\u200b \t\n"], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", ["nul\x00byte"], {}, "InvalidInput", "text:"),
    ("sentiment.analyze", [], {}, "InvalidInput", "text: is required"),
    ("sentiment.analyze", ["ok", "extra"], {}, "InvalidInput", "takes 1 (text), got 2"),
    ("sentiment.analyze", ["ok"], {"temperature": 0.5}, "InvalidInput", "temperature: unexpected"),
    ("sentiment.analyze_batch", [["ok"] * 100_000], {}, "InvalidInput", "texts: 100,000 texts"),
    ("sentiment.analyze_batch", [[]], {}, "InvalidInput", "texts:"),
    ("sentiment.analyze_batch", ["not a list"], {}, "InvalidInput", "texts:"),
    ("sentiment.analyze_batch", [["ok", 7]], {}, "InvalidInput", "texts[1]:"),
    (
        "forecast.prophet",
        [{"ds": DS, "y": list(range(10_000_000))}, 3],
        {},
        "InvalidMessage",
        "more than the limit of 16,777,216 (MODELWORKERS_MAX_MESSAGE_BYTES)",
    ),
    (
        "forecast.prophet",
        [{"ds": DS, "y": [*Y[:-1], float("inf")]}, 3],
        {},
        "InvalidInput",
        "series.y[23]",
    ),
    (
        "forecast.prophet",
        [{"ds": DS, "y": [*Y[:-1], float("-inf")]}, 3],
        {},
        "InvalidInput",
        "series.y[23]",
    ),
    ("forecast.prophet", [{"ds": DS, "y": [*Y[:-1], "12"]}, 3], {}, "InvalidInput", "series.y[23]"),
    ("forecast.prophet", [{"ds": DS, "y": [*Y[:-1], [1]]}, 3], {}, "InvalidInput", "series.y[23]"),
    (
        "forecast.prophet",
        [{"ds": [*DS[:-1], "2024-02-30"], "y": Y}, 3],
        {},
        "InvalidInput",
        "series.ds[23]",
    ),
    (
        "forecast.prophet",
        [{"ds": [*DS[:-1], "\uff12\uff10\uff12\uff14-01-25"], "y": Y}, 3],
        {},
        "InvalidInput",
        "series.ds",
    ),
    (
        "forecast.prophet",
        [{"ds": DS, "y": Y}, 3],
        {"frequency": "🙂"},
        "InvalidInput",
        "frequency:",
    ),
    ("forecast.prophet", [{"ds": DS, "y": Y}, True], {}, "InvalidInput", "horizon:"),
    ("forecast.prophet", [{"ds": DS, "y": Y}, 10**12], {}, "InvalidInput", "horizon:"),
    ("forecast.prophet", ["series", 3], {}, "InvalidInput", "series:"),
    ("forecast.prophet", [{"ds": DS, "y": Y, "cap": 3}, 3], {}, "InvalidInput", "series.cap:"),
    ("forecast.prophet", [{"ds": DS, "y": Y}], {}, "InvalidInput", "horizon: is required"),
    ("forecast.arima", [{"y": Y}, 3], {"order": [-1, 0, 0]}, "InvalidInput", "order:"),
    ("forecast.arima", [{"y": Y}, 3], {"order": [1.5, 0, 0]}, "InvalidInput", "order[0]:"),
    ("forecast.arima", [{"y": Y}, 3], {"order": None}, "InvalidInput", "order:"),
    ("forecast.arima", [{"y": []}, 3], {}, "InvalidInput", "series.y:"),
    ("forecast.predict", ["../models/models.toml", 3], {}, "ModelNotFound", "is not in"),
    ("forecast.predict", ["sentiment", 3], {}, "InvalidInput", "model:"),
    ("forecast.predict", [["co2_prophet"], 3], {}, "InvalidInput", "model:"),
    ("forecast.predict", ["co2_prophet", "3"], {}, "InvalidInput", "horizon:"),
    ("clustering.assign", [[ROW] * 100_000], {}, "InvalidInput", "rows: 100,000 rows"),
    ("clustering.assign", [[ROW, [1.0, 2.0]]], {}, "InvalidInput", "rows[1]:"),
    ("clustering.assign", [[[1.0, float("nan"), 2.0, 3.0]]], {}, "InvalidInput", "rows[0][1]:"),
    ("clustering.assign", [[{"recency": 1}]], {}, "InvalidInput", "rows[0]:"),
    ("clustering.assign", ["rows"], {}, "InvalidInput", "rows:"),
    ("clustering.assign", [[ROW]], {"model": "co2_prophet"}, "InvalidInput", "model:"),
    ("clustering.assign", [[ROW]], {"model": "ünïcødé-ghost"}, "ModelNotFound", "ünïcødé-ghost"),
    ("clustering.fit", [[ROW, ROW], 1], {}, "InvalidInput", "n_clusters:"),
    ("clustering.fit", [[ROW, ROW], 3], {}, "InvalidInput", "n_clusters:"),
    ("clustering.fit", [[[1e308, 1e308], [1.0, 2.0]], 2], {}, "InvalidInput", "rows"),
]


def test_the_catalogue_has_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("task", "args", "kwargs", "exc_type", "needle"),
    CASES,
    ids=[f"{i:02d}-{c[0]}-{c[4][:24]}" for i, c in enumerate(CASES)],
)
def test_bad_input_fails_fast_with_a_clear_error(
    client: Any, task: str, args: list[Any], kwargs: dict[str, Any], exc_type: str, needle: str
) -> None:
    t0 = time.perf_counter()
    result = client.send_task(task, args=args, kwargs=kwargs)
    result.get(timeout=60, propagate=False)
    elapsed = time.perf_counter() - t0
    got_type, message = stored_error(result)
    assert (got_type, needle in message) == (exc_type, True), message[:300]
    assert elapsed < 30, f"{task} took {elapsed:.1f} s to refuse"


def test_after_the_catalogue_the_worker_is_healthy_and_serves(
    client: Any, serving_worker: WorkerProcess
) -> None:
    assert len(serving_worker.children_pids()) == 2
    got = client.send_task("clustering.assign", args=[[ROW]]).get(timeout=30)
    assert len(got["labels"]) == 1
    assert all(s["ready"] for s in serving_worker.snapshots())
