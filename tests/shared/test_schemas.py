"""Bad input is refused with InvalidInput whose message starts with the field's path."""

from __future__ import annotations

from typing import Any

import pytest

from shared import schemas
from shared.errors import InvalidInput
from shared.settings import Settings

L = schemas.Limits.from_settings(Settings())
DS = [f"2024-01-{d:02d}" for d in range(1, 21)]
Y = [float(v) for v in range(20)]


def check(fn: Any, *args: Any) -> Any:
    return fn(*args, L)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("",), "text"),
        (("   ",), "text"),
        ((None,), "text"),
        ((42,), "text"),
        ((["a"],), "text"),
        (("x" * (L.max_text_chars + 1),), "text"),
        (("a\x00b",), "text"),
        (("\u200b\ufeff \n",), "text"),
    ],
)
def test_bad_sentiment_text_names_the_text_field(args: tuple[Any, ...], field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check(schemas.sentiment_text, *args)
    assert str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    ("texts", "field"),
    [
        ([], "texts"),
        ("not a list", "texts"),
        (["ok", 3], "texts[1]"),
        (["ok", ""], "texts[1]"),
        (["ok"] * (L.max_batch_texts + 1), "texts"),
        (["ok", "y" * (L.max_text_chars + 1)], "texts[1]"),
    ],
)
def test_bad_batches_name_the_offending_item(texts: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check(schemas.sentiment_texts, texts)
    assert str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    ("series", "horizon", "frequency", "field"),
    [
        ({"ds": DS, "y": Y[:-1]}, 3, "D", "series.ds"),
        ({"ds": DS[:5], "y": Y[:5]}, 3, "D", "series.y"),
        ({"ds": DS, "y": [*Y[:-1], float("nan")]}, 3, "D", "series.y[19]"),
        ({"ds": DS, "y": [*Y[:-1], float("inf")]}, 3, "D", "series.y[19]"),
        ({"ds": DS, "y": [*Y[:-1], "7"]}, 3, "D", "series.y[19]"),
        ({"ds": DS, "y": [*Y[:-1], True]}, 3, "D", "series.y[19]"),
        ({"ds": [*DS[:-1], "yesterday"], "y": Y}, 3, "D", "series.ds[19]"),
        ({"ds": list(reversed(DS)), "y": Y}, 3, "D", "series.ds"),
        ({"y": Y}, 3, "D", "series.ds"),
        ([1, 2, 3], 3, "D", "series"),
        ({"ds": DS, "y": Y, "extra": 1}, 3, "D", "series.extra"),
        ({"ds": DS, "y": Y}, 0, "D", "horizon"),
        ({"ds": DS, "y": Y}, -1, "D", "horizon"),
        ({"ds": DS, "y": Y}, L.max_horizon + 1, "D", "horizon"),
        ({"ds": DS, "y": Y}, 2.5, "D", "horizon"),
        ({"ds": DS, "y": Y}, "3", "D", "horizon"),
        ({"ds": DS, "y": Y}, 3, "fortnightly-ish", "frequency"),
        ({"ds": DS, "y": list(range(L.max_series_points + 1))}, 3, "D", "series.y"),
    ],
)
def test_bad_prophet_arguments_name_the_field(
    series: Any, horizon: Any, frequency: Any, field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        schemas.prophet_args(series, horizon, frequency, L)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize(
    ("series", "order", "field"),
    [
        ({"y": Y}, [1, 1], "order"),
        ({"y": Y}, [9, 1, 1], "order"),
        ({"y": Y}, "1,1,1", "order"),
        (
            {"ds": ["2024-01-01", "2024-01-02", "2024-01-09", *DS[3:]], "y": Y},
            [1, 0, 0],
            "series.ds",
        ),
    ],
)
def test_bad_arima_arguments_name_the_field(series: Any, order: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        schemas.arima_args(series, 3, order, L)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ([], "rows"),
        ([[]], "rows[0]"),
        ([[1, 2], [1]], "rows[1]"),
        ([[1, 2], [1, float("nan")]], "rows[1][1]"),
        ([[1, 2], [1, "x"]], "rows[1][1]"),
        ([[1, 2], {"a": 1}], "rows[1]"),
        ([[0.0]] * (L.max_rows + 1), "rows"),
    ],
)
def test_bad_rows_name_the_row_and_column(rows: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        schemas.assign_args(rows, "customer_segments", L)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


@pytest.mark.parametrize(
    ("n_clusters", "field"), [(1, "n_clusters"), (5, "n_clusters"), ("2", "n_clusters")]
)
def test_bad_cluster_counts_are_refused(n_clusters: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        schemas.fit_args([[1.0], [2.0], [3.0]], n_clusters, L)
    assert str(info.value).startswith(f"{field}:")


def test_valid_arguments_come_back_typed() -> None:
    args = schemas.prophet_args({"ds": DS, "y": [int(v) for v in Y]}, 3, "D", L)
    assert args.series.y == Y and args.horizon == 3
    assert schemas.arima_args({"y": Y}, 2, [1, 0, 1], L).order == [1, 0, 1]
    assert schemas.sentiment_texts(["é ☃ 👍", "ok"], L) == ["é ☃ 👍", "ok"]
