from __future__ import annotations

import threading
import time

import pytest

from shared.batching import MicroBatcher, pad_groups


def test_concurrent_requests_share_batches_and_get_their_own_answers() -> None:
    seen: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        seen.append(list(items))
        time.sleep(0.01)  # a forward pass: requests pile up meanwhile
        return [2 * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(double, max_size=16, window=0.002)
    results: dict[int, int] = {}
    start = threading.Barrier(40)

    def client(i: int) -> None:
        start.wait()
        results[i] = batcher.submit(i, timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == {i: 2 * i for i in range(40)}
    assert batcher.items == 40 and batcher.batches < 40 and batcher.largest > 1
    assert max(len(b) for b in seen) <= 16


def test_a_lone_request_runs_alone_without_waiting_for_the_window() -> None:
    batcher: MicroBatcher[str, str] = MicroBatcher(lambda xs: [x.upper() for x in xs], window=5.0)
    t0 = time.perf_counter()
    assert batcher.submit("a", timeout=10) == "A"
    assert time.perf_counter() - t0 < 1.0  # the 5 s window only applies under load
    assert batcher.largest == 1


def test_an_error_reaches_every_request_of_the_batch_and_the_batcher_survives() -> None:
    def fail_on_bad(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("bad item in batch")
        return items

    batcher: MicroBatcher[str, str] = MicroBatcher(fail_on_bad)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit("bad", timeout=10)
    assert batcher.submit("good", timeout=10) == "good"


def test_lanes_run_batches_side_by_side_each_after_its_own_init() -> None:
    """Two lanes: a batch waits (bounded) for a second batch to run at the same time, which
    only a second lane can start; each lane's thread ran ``lane_init`` before its batches."""
    inited: set[int] = set()
    ran_in: set[int] = set()
    together = threading.Barrier(2, timeout=10)

    def both_at_once(items: list[int]) -> list[int]:
        assert threading.get_ident() in inited  # init came first, in this very thread
        ran_in.add(threading.get_ident())
        together.wait()  # BrokenBarrierError after 10 s if the batches ran one after the other
        return [i + 1 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        both_at_once, lanes=2, lane_init=lambda: inited.add(threading.get_ident())
    )
    results: dict[int, int] = {}
    first = threading.Thread(target=lambda: results.update({1: batcher.submit(1, timeout=20)}))
    first.start()
    wait = time.monotonic() + 10
    while together.n_waiting < 1 and time.monotonic() < wait:  # the first batch is running
        time.sleep(0.005)
    results[2] = batcher.submit(2, timeout=20)
    first.join(timeout=20)
    assert results == {1: 2, 2: 3}
    assert len(ran_in) == 2 and ran_in <= inited and len(inited) == 2
    assert batcher.stats()["lanes"] == 2 and batcher.batches == 2


def test_submit_many_answers_in_order_across_batches_and_lanes() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda xs: [x * x for x in xs], max_size=4, lanes=2
    )
    items = list(range(37))
    assert batcher.submit_many(items, timeout=20) == [i * i for i in items]
    assert batcher.items == 37 and batcher.batches >= 10  # at most 4 per batch
    assert batcher.submit_many([], timeout=1) == []


def test_lanes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lanes"):
        MicroBatcher(lambda xs: xs, lanes=0)


@pytest.mark.parametrize("ratio", [1.0, 1.25, 2.0])
def test_pad_groups_cover_every_item_once_and_keep_padding_within_the_ratio(ratio: float) -> None:
    lengths = [12, 3, 40, 7, 7, 128, 9, 33, 3, 15, 64, 5, 21, 8, 8, 8]
    groups = pad_groups(lengths, ratio)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[i] for i in group]
        assert sizes == sorted(sizes)
        assert len(group) == 1 or len(group) * max(sizes) <= ratio * sum(sizes)
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < len(lengths) * max(lengths)  # less padding than one batch padded to 128


def test_pad_groups_without_a_ratio_keep_one_batch_in_order() -> None:
    assert pad_groups([5, 1, 9], 0) == [[0, 1, 2]]
    assert pad_groups([5], 1.25) == [[0]]
    assert pad_groups([], 1.25) == [[]]
    assert pad_groups([4, 4, 4, 4], 1.0) == [[0, 1, 2, 3]]  # equal lengths: no split


def test_a_batch_answered_with_the_wrong_count_fails_at_once_and_the_lane_serves_on() -> None:
    from shared.batching import BatchError

    def miscount(items: list[str]) -> list[str]:
        return [*items, "extra"] if "bad" in items else list(items)

    batcher: MicroBatcher[str, str] = MicroBatcher(miscount, window=0.0)
    t0 = time.perf_counter()
    with pytest.raises(BatchError, match="returned 2 results for 1 inputs"):
        batcher.submit("bad", timeout=5)
    assert time.perf_counter() - t0 < 1.0
    assert batcher.submit("good", timeout=5) == "good"
    assert batcher.stats()["failed_batches"] == 1


def test_a_batch_function_that_raises_fails_its_batch_and_the_lane_serves_on() -> None:
    def explode(items: list[int]) -> list[int]:
        if 0 in items:
            raise ZeroDivisionError("division by zero")
        return [10 // i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(explode, window=0.0)
    with pytest.raises(ZeroDivisionError):
        batcher.submit(0, timeout=5)
    assert batcher.submit(5, timeout=5) == 2


def test_a_lane_stuck_past_its_limit_is_replaced_and_waiters_stop_waiting() -> None:
    release = threading.Event()

    def maybe_stuck(items: list[str]) -> list[str]:
        if "stuck" in items:
            release.wait(30)  # native code that does not return
        return list(items)

    batcher: MicroBatcher[str, str] = MicroBatcher(
        maybe_stuck, window=0.0, stuck_after=0.2, on_timeout=lambda: TimeoutError("too slow")
    )
    with pytest.raises(TimeoutError, match="too slow"):
        batcher.submit("stuck", timeout=0.5)
    assert batcher.stats()["replaced_lanes"] == 1
    assert batcher.submit("next", timeout=5) == "next"  # served by the new lane
    release.set()
    batcher.close()


def test_close_stops_the_lanes_and_refuses_new_requests() -> None:
    from shared.batching import BatcherClosed

    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: xs, lanes=2, window=0.0)
    assert batcher.submit(1, timeout=5) == 1
    batcher.close()
    assert not any(t.is_alive() for t in batcher._lanes)
    with pytest.raises(BatcherClosed):
        batcher.submit(2, timeout=5)
