"""Micro-batching: concurrent callers' requests run through the models together.

Callers (threads) `submit` one request and block on its result; a single worker thread takes
whatever has queued (at most `max_batch`), groups requests
that can share one model call by `key(request)`, and runs `fn` once per group. When a group's call
fails, its members are rerun one by one, so a bad request fails alone and its neighbours succeed. On 2 cores one
batched encoder/refiner/FAISS call costs little more than a single one, so throughput grows with
concurrency instead of queueing.

How long to wait for company: only when the previous batch had company (a lone client never
waits), at least `wait_ms`, and up to `fill_fraction` of the previous batch's run time for as many
requests as it held. With a cheap model (the compact encoder: ~2 ms a batch) that is a fraction of
a millisecond; with full-size CLAP (~300 ms for 32 sentences) it lets the clients that were just
answered come back and join, instead of running them as a small batch that costs almost what a
full one does (measured: BENCHMARKS.md, "Batching the CLAP text tower").
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Req = TypeVar("Req")
Res = TypeVar("Res")


class MicroBatcher(Generic[Req, Res]):
    def __init__(
        self,
        fn: Callable[[Sequence[Req]], Sequence[Res]],
        *,
        key: Callable[[Req], Hashable] = lambda r: 0,
        max_batch: int = 32,
        wait_ms: float = 2.0,
        fill_fraction: float = 0.25,
        name: str = "batcher",
    ) -> None:
        assert max_batch >= 1, "max_batch must be positive"
        assert 0.0 <= fill_fraction <= 1.0, f"fill_fraction {fill_fraction} outside [0, 1]"
        self.fn, self.key, self.max_batch, self.wait_s = fn, key, max_batch, wait_ms / 1000
        self.fill_fraction = fill_fraction
        self._queue: queue.Queue[tuple[Req, Future[Res]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.batches_run = 0
        self.requests_run = 0
        self.isolated_retries = 0  # failed batches whose members were rerun one by one
        self.largest_batch = 0
        self._last_batch = 0
        self._last_run_s = 0.0  # how long the last batch's model calls took

    def submit(self, request: Req, timeout: float | None = 60.0) -> Res:
        return self.submit_many([request], timeout)[0]

    def submit_many(self, requests: Sequence[Req], timeout: float | None = 60.0) -> list[Res]:
        """Several requests of one caller (a batch endpoint): queued together, so they share model
        calls with each other and with whatever else is queued; results in order."""
        futures: list[Future[Res]] = []
        for request in requests:
            future: Future[Res] = Future()
            self._queue.put((request, future))
            futures.append(future)
        return [f.result(timeout=timeout) for f in futures]

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            pending = [first]
            company = self._last_batch > 1
            fill_s = self.fill_fraction * self._last_run_s
            start = time.monotonic()
            floor, ceiling = start + (self.wait_s if company else 0.0), start + (fill_s if company else 0.0)
            expected = min(self._last_batch, self.max_batch)
            while len(pending) < self.max_batch:
                # wait to the floor for anyone, and on to the ceiling while fewer than last time came
                deadline = max(floor, ceiling) if len(pending) < expected else floor
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                pending.append(nxt)
            self._last_batch = len(pending)
            run_start = time.monotonic()
            groups: dict[Hashable, list[tuple[Req, Future[Res]]]] = {}
            for req, fut in pending:
                try:
                    groups.setdefault(self.key(req), []).append((req, fut))
                except Exception as exc:  # a bad request fails alone
                    fut.set_exception(exc)
            for group in groups.values():
                self._run_group(group)
            self._last_run_s = time.monotonic() - run_start

    def _run_group(self, group: list[tuple[Req, Future[Res]]]) -> None:
        self.batches_run += 1
        self.requests_run += len(group)
        self.largest_batch = max(self.largest_batch, len(group))
        try:
            results = self.fn([req for req, _ in group])
            assert len(results) == len(group), f"batch fn returned {len(results)} results for {len(group)} requests"
        except Exception as exc:
            if len(group) == 1:
                group[0][1].set_exception(exc)
                return
            # One bad request must not fail its neighbours: run each alone, so only it fails.
            self.isolated_retries += 1
            for member in group:
                self._run_group([member])
            return
        for (_, fut), res in zip(group, results, strict=True):
            fut.set_result(res)
