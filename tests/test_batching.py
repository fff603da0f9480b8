"""The micro-batcher: results go back to their own callers, groups share calls, a lone caller never waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from diffgap.retrieval.batching import MicroBatcher


def test_concurrent_callers_share_calls_and_get_their_own_results() -> None:
    calls: list[int] = []

    def double(xs: Sequence[int]) -> list[int]:
        calls.append(len(xs))
        time.sleep(0.02)  # a model call: others queue up meanwhile
        return [2 * x for x in xs]

    batcher = MicroBatcher(double, key=lambda x: x % 2, max_batch=8, wait_ms=5)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.submit(i))) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert results == {i: 2 * i for i in range(40)}
    assert sum(calls) == 40 and len(calls) < 40 and max(calls) <= 8


def test_a_lone_caller_does_not_wait_for_company() -> None:
    batcher = MicroBatcher(lambda xs: list(xs), wait_ms=100_000)  # waiting would blow the timeout below
    assert [batcher.submit(i, timeout=5) for i in range(3)] == [0, 1, 2]
    batcher.close()


def test_a_failing_group_fails_alone() -> None:
    def run(xs: Sequence[int]) -> list[int]:
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return list(xs)

    batcher = MicroBatcher(run, key=lambda x: x < 0)
    with pytest.raises(ValueError, match="negative"):
        batcher.submit(-1)
    assert batcher.submit(3) == 3
    batcher.close()


def test_a_poisoned_request_fails_alone_and_its_batch_neighbours_succeed() -> None:
    calls: list[int] = []

    def run(xs: Sequence[int]) -> list[int]:
        calls.append(len(xs))
        time.sleep(0.01)
        if any(x == 13 for x in xs):
            raise ValueError("unlucky")
        return [x + 1 for x in xs]

    batcher = MicroBatcher(run, max_batch=64, wait_ms=20)
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            outcomes[i] = batcher.submit(i)
        except ValueError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert isinstance(outcomes.pop(13), ValueError)
    assert outcomes == {i: i + 1 for i in range(30) if i != 13}
    assert batcher.isolated_retries >= 1 and max(calls) > 1  # it was batched, then isolated


def _closed_loop_batches(fill_fraction: float) -> list[int]:
    """8 clients, each sending its next request 0-20 ms after its last answer, against a 0.15 s model."""
    sizes: list[int] = []

    def model(xs: Sequence[int]) -> list[int]:
        sizes.append(len(xs))
        time.sleep(0.15)
        return list(xs)

    batcher = MicroBatcher(model, max_batch=32, wait_ms=0, fill_fraction=fill_fraction)

    def client(i: int) -> None:
        for n in range(6):
            time.sleep(((i * 7 + n * 3) % 11) * 0.002)  # staggered returns, as answered clients come back
            assert batcher.submit(i * 100 + n, timeout=30) == i * 100 + n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert sum(sizes) == 48
    return sizes


def test_the_batcher_waits_for_last_batchs_company_when_the_model_is_slow() -> None:
    filled = _closed_loop_batches(fill_fraction=0.5)  # waits up to 75 ms for the 8 to come back
    eager = _closed_loop_batches(fill_fraction=0.0)  # runs whoever is there: stragglers make small batches
    assert len(filled) < len(eager), (filled, eager)
    assert sum(s >= 7 for s in filled[1:]) >= len(filled[1:]) - 1, filled
