"""The query path: encode -> (optionally refine toward audio space) -> FAISS search -> items."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffgap.encoders import EncoderSet
from diffgap.encoders.base import l2_normalize
from diffgap.store import IndexStore, Item


@dataclass
class Hit:
    item: Item
    score: float


@dataclass
class SearchResult:
    hits: list[list[Hit]]  # one ranked list per query
    timings_ms: dict[str, float] = field(default_factory=dict)


class Searcher:
    """Holds an open index and its encoders; `refiner` (optional) maps query vectors toward audio space."""

    def __init__(self, store: IndexStore, encoders: EncoderSet, refiner: Any | None = None) -> None:
        self.store = store
        self.encoders = encoders
        self.refiner = refiner

    def embed_text(self, texts: list[str]) -> np.ndarray:
        if self.encoders.text is None:
            raise ValueError("this index has no text encoder")
        return self.encoders.text.encode(texts)

    def search_vectors(
        self,
        xq: np.ndarray,
        k: int,
        *,
        modality: str = "text",
        refine: bool = False,
        refine_options: dict[str, Any] | None = None,
    ) -> SearchResult:
        timings: dict[str, float] = {}
        xq = l2_normalize(np.asarray(xq, dtype=np.float32))
        if refine:
            if self.refiner is None:
                raise ValueError("no refiner is loaded for this index")
            t0 = time.perf_counter()
            xq = self.refiner.refine(xq, direction=0, **(refine_options or {}))
            timings["refine"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        k_eff = max(1, min(k, self.store.load_faiss().ntotal))
        scores, ids = self.store.search(xq, k_eff)
        timings["search"] = (time.perf_counter() - t0) * 1e3
        items = self.store.items(int(i) for i in np.unique(ids) if i >= 0)
        hits = [
            [Hit(items[int(i)], float(s)) for s, i in zip(srow, irow, strict=True) if i >= 0 and int(i) in items]
            for srow, irow in zip(scores, ids, strict=True)
        ]
        return SearchResult(hits, timings)

    def search_text(self, texts: list[str], k: int, **kwargs: Any) -> SearchResult:
        t0 = time.perf_counter()
        xq = self.embed_text(texts)
        encode_ms = (time.perf_counter() - t0) * 1e3
        result = self.search_vectors(xq, k, modality="text", **kwargs)
        result.timings_ms = {"encode": encode_ms, **result.timings_ms}
        return result
