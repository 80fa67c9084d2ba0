from __future__ import annotations

import threading
import time

import pytest

from shared.deadline import time_limit


class Late(Exception):
    pass


def spin() -> None:
    while True:
        time.sleep(0.01)


def test_a_block_in_the_main_thread_is_interrupted_at_its_limit_even_in_a_sleep() -> None:
    t0 = time.perf_counter()
    with pytest.raises(Late), time_limit(0.2, Late):
        time.sleep(5)
    assert 0.2 <= time.perf_counter() - t0 < 1.0


def test_a_block_in_another_thread_is_interrupted_even_if_it_catches_exceptions() -> None:
    outcome: list[str] = []

    def run() -> None:
        def stubborn() -> None:
            while True:
                try:
                    spin()
                except Exception:  # a model's own broad except must not swallow the limit
                    outcome.append("swallowed")

        try:
            with time_limit(0.2, Late):
                stubborn()
        except Late:
            outcome.append("late")
        time.sleep(0.3)  # no stray interruption after the block
        outcome.append("after")

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert outcome == ["late", "after"]


def test_a_block_that_ends_in_time_is_not_interrupted_later() -> None:
    for _ in range(50):
        with time_limit(0.05, Late):
            pass
    time.sleep(0.1)
    with time_limit(None, Late):
        time.sleep(0.01)
