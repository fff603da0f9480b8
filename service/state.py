"""Everything the service loads once: the index, its encoders and refiners, and the micro-batcher.

A reload builds a complete new `ServiceState` next to the old one and swaps a single reference,
so requests in flight finish on the state they started with and none is dropped.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffgap.encoders import EncoderSet
from diffgap.index.layout import CACHE_DIR
from diffgap.index.store import IndexStore
from diffgap.media.waveform import WaveformCache
from diffgap.resources import available_cpus, set_compute_threads
from diffgap.retrieval.batching import MicroBatcher
from diffgap.retrieval.search import Query, QueryResult, Searcher, open_searcher
from diffgap.retrieval.sources import SourceFiles
from service.settings import Settings

log = logging.getLogger("diffgap.serve")


@dataclass
class ServiceState:
    store: IndexStore
    encoders: EncoderSet
    searcher: Searcher
    sources: SourceFiles  # the items' files, checked before they are played
    waveforms: WaveformCache  # thumbnails, drawn once

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
    # And the library side of a two-sided refiner: every window mapped once (~35 us each on one core).
    t = time.perf_counter()
    if mapped := searcher.warm_library():
        log.info("mapped the library side in %.1f s: %s", time.perf_counter() - t,
                 ", ".join(f"{n} windows for the {name} refiner" for name, n in mapped.items()))  # fmt: skip
    # So does what a text tower builds at its first call: a beside tower's vocabulary vectors (seconds).
    if searcher.encoders.text is not None:
        searcher.encoders.text.encode(["warm up"])
    sources = SourceFiles(Path(manifest.corpus_root or "."), searcher.store)
    waveforms = WaveformCache(writable_dir(settings.cache_dir or Path(settings.index_dir) / CACHE_DIR / "waveforms"))
    return ServiceState(searcher.store, searcher.encoders, searcher, sources, waveforms)


def settle_heap() -> None:
    """Put what a load made (models, tokenizers, index metadata: most of the process's objects) out of
    the cyclic garbage collector's walk. Left in, every full collection walked all of them: a 352 ms
    pause in the middle of a request in a run of 2,000 word queries (bench/tails.py; 2.35 ms at most
    after). What the previous state froze is unfrozen first, so a replaced state's cycles can still be
    freed; the one full collection made here is one such pause per load, on the loading thread."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def writable_dir(preferred: Path) -> Path:
    """`preferred` when the service may write there (beside the index), else a folder under /tmp (an
    index mounted read-only still gets its thumbnails cached)."""
    for folder in (preferred, Path(tempfile.gettempdir()) / "diffgap-cache" / "waveforms"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return folder
        except OSError:
            continue
    return preferred  # not writable anywhere: thumbnails are drawn each time


PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\"(),;:]+")


def redact_paths(text: str) -> str:
    """`text` without file-system paths: what a client may see of a server-side error."""
    return PATH.sub("<path>", text)


class StateHolder:
    """The current state, swappable under load; the batcher always runs on the current one.

    Reloads coalesce: a reload asked for while one runs waits for the next one to start after it
    (which sees every change made before the ask), and all asks that arrive meanwhile share it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state: ServiceState | None = None
        self.error: str | None = None  # for the log: may name server paths
        self.generation = 0  # states swapped in so far: the first load is 1
        self._reload = threading.Condition()
        self._asked = self._started = self._finished = 0  # reload tickets
        self._running = False
        self._outcome: dict[int, BaseException | None] = {}
        # never more threads than the container's quota, shared out between the workers
        cpus = max(1, available_cpus() // settings.workers)
        blas = min(settings.blas_threads, cpus) if settings.blas_threads else None
        set_compute_threads(min(settings.threads, cpus), blas, cpus)
        self.batcher: MicroBatcher[Query, QueryResult] = MicroBatcher(
            self._run_batch,
            key=lambda q: q.batch_key,
            max_batch=settings.batch_max,
            wait_ms=settings.batch_wait_ms,
            fill_fraction=settings.batch_fill_fraction,
        )

    @property
    def public_error(self) -> str | None:
        return redact_paths(self.error) if self.error else None

    def _run_batch(self, queries: Sequence[Query]) -> list[QueryResult]:
        state = self.state
        if state is None:
            raise RuntimeError("index not loaded")
        return state.searcher.run(queries)

    def load(self) -> None:
        """Load (or reload) the index; concurrent calls share one reload that starts after they asked."""
        with self._reload:
            self._asked += 1
            ticket = self._asked
            while self._finished < ticket:
                if self._running:
                    self._reload.wait()
                    continue
                self._running, covers = True, self._asked  # this run serves every ask so far
                self._reload.release()
                try:
                    error = self._swap_in()
                finally:
                    self._reload.acquire()
                    self._running = False
                for t in range(self._finished + 1, covers + 1):
                    self._outcome[t] = error
                self._finished = covers
                self._reload.notify_all()
            error = self._outcome.pop(ticket)
        if error is not None:
            raise error

    def _swap_in(self) -> BaseException | None:
        try:
            new = load_state(self.settings)
        except Exception as exc:
            self.error = f"{exc.__class__.__name__}: {exc}"
            log.error("loading the index failed: %s", self.error)
            return exc
        old, self.state, self.error = self.state, new, None
        self.generation += 1
        if old is not None:
            log.info("swapped in the reloaded index")
            # Requests still running on the old state hold it; its SQLite connection closes when the
            # last of them lets go (shared refiners and memory maps are freed with it).
        del old
        settle_heap()
        return None

    def close(self) -> None:
        self.batcher.close()
        if self.state is not None:
            self.state.close()
