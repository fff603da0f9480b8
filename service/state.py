"""Everything the service loads once: the index, its encoders and refiners, and the micro-batcher.

A reload builds a complete new `ServiceState` next to the old one and swaps a single reference,
so requests in flight finish on the state they started with and none is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import torch

from diffgap.encoders import EncoderSet
from diffgap.index.store import IndexStore
from diffgap.resources import available_cpus
from diffgap.retrieval.batching import MicroBatcher
from diffgap.retrieval.search import Query, QueryResult, Searcher, open_searcher
from service.settings import Settings

log = logging.getLogger("diffgap.serve")


@dataclass
class ServiceState:
    store: IndexStore
    encoders: EncoderSet
    searcher: Searcher
    corpus_root: Path

    def close(self) -> None:
        self.store.close()


def load_state(settings: Settings) -> ServiceState:
    searcher = open_searcher(settings.index_dir, video_encoder=settings.video_encoder, mmap=settings.mmap)
    manifest = searcher.store.manifest
    log.info(
        "loaded %s: %d items, %s, refiners: %s",
        settings.index_dir,
        searcher.store.ntotal,
        manifest.encoder_spec,
        ", ".join(searcher.refiners) or "none",
    )
    # Warm up before /readyz says yes: the first refinement traces the network (~140 ms measured on
    # the demo), which belongs in startup, not in a user's first query.
    for refiner in searcher.refiners.values():
        refiner.warm_up()
    root = Path(manifest.corpus_root or ".").resolve()
    return ServiceState(searcher.store, searcher.encoders, searcher, root)


class StateHolder:
    """The current state, swappable under load; the batcher always runs on the current one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: ServiceState | None = None
        self.error: str | None = None
        self._swap_lock = threading.Lock()
        threads = min(settings.threads, available_cpus())  # never more than the container's CPU quota
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self.batcher: MicroBatcher[Query, QueryResult] = MicroBatcher(
            self._run_batch, key=lambda q: q.batch_key, max_batch=settings.batch_max, wait_ms=settings.batch_wait_ms
        )

    def _run_batch(self, queries: Sequence[Query]) -> list[QueryResult]:
        state = self.state
        if state is None:
            raise RuntimeError("index not loaded")
        return state.searcher.run(queries)

    def load(self) -> None:
        try:
            new = load_state(self.settings)
        except Exception as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"
            log.error("loading the index failed: %s", self.error)
            raise
        with self._swap_lock:
            old, self.state, self.error = self.state, new, None
        if old is not None:
            log.info("swapped in the reloaded index")
            # the old store stays open for requests that still hold it; SQLite closes with it on GC

    def close(self) -> None:
        self.batcher.close()
        if self.state is not None:
            self.state.close()
