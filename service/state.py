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
import numpy as np
import torch

from diffgap.batching import MicroBatcher
from diffgap.encoders import EncoderSet, load_encoders
from diffgap.refiner import Refiner
from diffgap.resources import available_cpus
from diffgap.search import Hit, Query, Searcher
from diffgap.store import IndexStore
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
    store = IndexStore.open(settings.index_dir, readonly=True)
    manifest = store.manifest
    video_spec = settings.video_encoder
    encoders = load_encoders(manifest.encoder_spec, video_spec)
    store.check_fingerprint(encoders.audio.fingerprint)
    refiners: dict[str, Refiner] = {}
    for modality in ("text", "video"):
        path = Path(settings.index_dir) / f"refiner-{modality}"
        if not (path / "refiner.json").exists():
            continue
        refiner = Refiner.load(path)
        query_encoder = encoders.text if modality == "text" else encoders.video
        if query_encoder is None and modality == "video" and refiner.config.training.get("video_encoder_spec"):
            encoders.video = load_encoders(refiner.config.training["video_encoder_spec"], need_text=False).video
            query_encoder = encoders.video
        refiner.check_encoders(encoders.audio.fingerprint, query_encoder.fingerprint if query_encoder else None)
        refiners[modality] = refiner
    store.load_faiss(mmap=settings.mmap and manifest.index_type == "Flat")
    root = Path(manifest.corpus_root or ".").resolve()
    log.info(
        "loaded %s: %d items, %s, refiners: %s",
        settings.index_dir,
        store.load_faiss().ntotal,
        manifest.encoder_spec,
        ", ".join(refiners) or "none",
    )
    # Warm up before /readyz says yes: the first refinement traces the network (~140 ms measured on
    # the demo), which belongs in startup, not in a user's first query.
    for refiner in refiners.values():
        cond_dim = refiner.dims(0)[1]
        refiner.refine(np.full((1, cond_dim), cond_dim**-0.5, dtype=np.float32), steps=1)
    return ServiceState(store, encoders, Searcher(store, encoders, refiners), root)


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
        self.batcher: MicroBatcher[Query, tuple[list[Hit], dict[str, float]]] = MicroBatcher(
            self._run_batch, key=lambda q: q.batch_key, max_batch=settings.batch_max, wait_ms=settings.batch_wait_ms
        )

    def _run_batch(self, queries: Sequence[Query]) -> list[tuple[list[Hit], dict[str, float]]]:
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
