"""The query path: encode -> (optionally refine toward audio space) -> FAISS search -> items.

`Searcher.run` takes a batch of queries that share refinement options and runs each stage once
for the whole batch, so callers that micro-batch concurrent requests get batched model calls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffgap.encoders import EncoderSet
from diffgap.encoders.base import l2_normalize
from diffgap.refiner import Refiner
from diffgap.store import IndexStore, Item


@dataclass(frozen=True)
class ItemFilter:
    """Metadata conditions an item must meet; None fields are not checked."""

    path_prefix: str | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (key, substring), case-insensitive
    description: str | None = None  # every word must occur in the item's description

    def matches(self, item: Item) -> bool:
        if self.path_prefix and not item.path.startswith(self.path_prefix):
            return False
        duration = item.duration or 0.0
        if self.min_duration is not None and duration < self.min_duration:
            return False
        if self.max_duration is not None and duration > self.max_duration:
            return False
        if self.description and not all(w in item.description.lower() for w in self.description.lower().split()):
            return False
        return all(needle.lower() in str(item.tags.get(key, "")).lower() for key, needle in self.tags)


@dataclass(frozen=True)
class RefineSpec:
    """How to refine; hashable so queries with equal specs share one batched refiner call."""

    steps: int = 5
    mode: str = "sample"
    blend: float | None = None  # None: the refiner's own weight, chosen when it was trained
    start_noise: float | None = None  # None: 0 (the prior's mean) for sample, 1 for bridge

    def options(self) -> dict[str, Any]:
        return {"steps": self.steps, "mode": self.mode, "blend": self.blend, "start_noise": self.start_noise}


@dataclass
class Query:
    modality: str  # "text" | "video" | "audio"
    k: int
    text: str | None = None
    vector: np.ndarray | None = None  # (dim,) already in the query encoder's space
    refine: RefineSpec | None = None
    filter: ItemFilter | None = None

    @property
    def batch_key(self) -> tuple[str, RefineSpec | None, bool]:
        return self.modality, self.refine, self.text is not None


@dataclass
class Hit:
    item: Item
    score: float


@dataclass
class SearchResult:
    hits: list[list[Hit]]  # one ranked list per query
    timings_ms: dict[str, float] = field(default_factory=dict)


class Searcher:
    """An open index, its encoders and refiners (by query modality)."""

    def __init__(self, store: IndexStore, encoders: EncoderSet, refiners: dict[str, Refiner] | Refiner | None = None):
        self.store = store
        self.encoders = encoders
        if isinstance(refiners, Refiner):
            refiners = {refiners.config.query_modality: refiners}
        self.refiners: dict[str, Refiner] = refiners or {}

    @property
    def refiner(self) -> Refiner | None:
        return self.refiners.get("text")

    def query_dim(self, modality: str) -> int:
        encoder = {"text": self.encoders.text, "video": self.encoders.video, "audio": self.encoders.audio}[modality]
        if encoder is None:
            raise ValueError(f"no {modality} encoder is loaded for this index")
        return encoder.dim

    def run(self, queries: Sequence[Query]) -> list[tuple[list[Hit], dict[str, float]]]:
        """Queries that share modality and refinement; returns (hits, per-stage ms) for each."""
        assert queries, "empty batch"
        modality, spec = queries[0].modality, queries[0].refine
        assert all(q.modality == modality and q.refine == spec for q in queries), "mixed batch"
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        texts = [q.text for q in queries if q.text is not None]
        if texts:
            if self.encoders.text is None:
                raise ValueError("this index has no text encoder")
            xt = iter(self.encoders.text.encode(texts))
            xq = np.stack([next(xt) if q.text is not None else q.vector for q in queries])  # (B, c)
            timings["encode"] = (time.perf_counter() - t0) * 1e3
        else:
            xq = np.stack([q.vector for q in queries])
        xq = l2_normalize(np.asarray(xq, dtype=np.float32))
        if spec is not None:
            refiner = self.refiners.get(modality)
            if refiner is None:
                raise ValueError(f"no {modality} refiner is loaded for this index")
            t1 = time.perf_counter()
            xq = refiner.refine(xq, direction=0, **spec.options())
            timings["refine"] = (time.perf_counter() - t1) * 1e3
        elif xq.shape[1] != self.store.manifest.dim:
            raise ValueError(
                f"{modality} vectors ({xq.shape[1]}-d) need a refiner to search this "
                f"{self.store.manifest.dim}-d audio index"
            )
        t2 = time.perf_counter()
        hits = self._search(xq, queries)
        timings["search"] = (time.perf_counter() - t2) * 1e3
        return [(h, timings) for h in hits]

    def _search(self, xq: np.ndarray, queries: Sequence[Query]) -> list[list[Hit]]:
        ntotal = self.store.load_faiss().ntotal
        if ntotal == 0:
            return [[] for _ in queries]
        filtered = any(q.filter is not None for q in queries)
        want = max(q.k for q in queries)
        k = min(ntotal, want * 10 if filtered else want)
        while True:
            scores, ids = self.store.search(xq, k)
            items = self.store.items(int(i) for i in np.unique(ids) if i >= 0)
            out = []
            for q, srow, irow in zip(queries, scores, ids, strict=True):
                row = [Hit(items[int(i)], float(s)) for s, i in zip(srow, irow, strict=True) if int(i) in items]
                if q.filter is not None:
                    row = [h for h in row if q.filter.matches(h.item)]
                out.append(row[: q.k])
            short = any(len(r) < q.k for r, q in zip(out, queries, strict=True) if q.filter is not None)
            if not short or k >= ntotal:
                return out
            k = min(ntotal, k * 4)  # a selective filter: look deeper

    # convenience for one-off use (CLI, notebooks)
    def search_text(
        self, texts: list[str], k: int, *, refine: bool = False, refine_options: dict[str, Any] | None = None
    ) -> SearchResult:
        spec = RefineSpec(**(refine_options or {})) if refine else None
        results = self.run([Query("text", k, text=t, refine=spec) for t in texts])
        return SearchResult([r[0] for r in results], results[0][1] if results else {})

    def search_vectors(
        self,
        xq: np.ndarray,
        k: int,
        *,
        modality: str = "audio",
        refine: bool = False,
        refine_options: dict[str, Any] | None = None,
    ) -> SearchResult:
        spec = RefineSpec(**(refine_options or {})) if refine else None
        results = self.run([Query(modality, k, vector=v, refine=spec) for v in np.asarray(xq, dtype=np.float32)])
        return SearchResult([r[0] for r in results], results[0][1] if results else {})
