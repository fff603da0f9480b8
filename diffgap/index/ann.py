"""Which FAISS index an index directory gets, and how hard an approximate one searches.

`--index-type auto` (the default for new indexes) keeps exact search (Flat) while it is cheap and
switches to an HNSW graph above a size measured on 2 cores (`bench/search_bench.py --sections auto`,
BENCHMARKS.md "Choosing the index type"): exact search costs one pass over every vector per query,
HNSW a few hundred distance computations. HNSW rather than IVF because at a million items HNSW32
reached recall@10 0.99 in 0.2 ms where IVF needed 1.3 ms for 0.93 on the same data, and it needs no
training. Its one weakness, no removal, is handled by `sync_faiss`: an update that deletes items
rebuilds the graph.

An approximate index's search effort (HNSW efSearch, IVF nprobe) is chosen when it is built: the
smallest effort whose recall@10 against exact search reaches `TARGET_RECALL` for a sample of the
index's own vectors *held out of it* until the measurement is done (`sync_faiss` adds them last;
an update that brings enough new vectors measures again with them before adding them). Held out
because a vector already in an HNSW graph is linked to its own neighbours: measured at 100k items,
recall@10 0.98 for stored vectors against 0.83 for fresh queries at efSearch 16, while held-out
vectors behave as fresh queries do. The measured recall is kept in the manifest (`tuning`), shown by
`diffgap-index info` and /readyz, and a query may ask for more (or less) effort.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from diffgap.index.layout import AUTO_INDEX_TYPE, FLAT_INDEX_TYPE
from diffgap.index.vectors import FlatView, effort_knob, search_params

APPROXIMATE = "HNSW32"  # 32 links per node: the best recall per ms of the HNSW sizes measured
# Exact search while one query's pass over the vectors costs about what the rest of a query does
# (~2 ms on one core): measured 2.2 ms at 50k x 512 floats and 2.5 ms at 100k x 256, against
# 0.09-0.16 ms for HNSW at its tuned effort with recall@10 >= 0.98 (BENCHMARKS.md). Counted in
# floats, since the cost of a pass is n * dim.
AUTO_FLAT_MAX_FLOATS = 50_000 * 512
TARGET_RECALL = 0.95
RECALL_QUERIES = 200  # held-out vectors the recall is measured on: +-0.015 at recall 0.95
EFFORTS = (16, 32, 64, 128, 256, 512, 1024)  # tried in order; the first to reach the target is kept


def resolve_index_type(requested: str, n: int, dim: int) -> str:
    """The FAISS factory string for an index of `n` vectors of `dim` floats."""
    if requested != AUTO_INDEX_TYPE:
        return requested
    return FLAT_INDEX_TYPE if n * dim <= AUTO_FLAT_MAX_FLOATS else APPROXIMATE


@dataclass(frozen=True)
class SearchTuning:
    """The effort an approximate index searches with by default, and the recall it was measured at."""

    knob: str  # efSearch | nprobe
    effort: int
    recall_at_10: float  # for `queries` of the index's own vectors, held out of it while measured
    queries: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchTuning | None:
        return cls(**data) if data else None


def exact_neighbours(xq: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Ids (Q, k) of the exact top-k of each query over (ids, xb) blocks; -1 past the end."""
    best_s = np.full((len(xq), 0), -np.inf, np.float32)
    best_i = np.zeros((len(xq), 0), np.int64)
    for xids, xb in blocks:
        s, i = FlatView.from_arrays(xids, xb).search(xq, k)  # (Q, k) each
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top 10 that was found (rows of ids, best first, -1 = none)."""
    overlaps = []
    for f, t in zip(found, truth, strict=True):
        t_ids = {int(i) for i in t[:10] if i >= 0}
        if t_ids:
            overlaps.append(len(t_ids & {int(i) for i in f[:10]}) / len(t_ids))
    return float(np.mean(overlaps)) if overlaps else 1.0


def held_out_count(n: int) -> int:
    """How many of n vectors to hold out for the recall measurement (a fifth of a small index)."""
    return min(RECALL_QUERIES, n // 5)


def tune_effort(
    index: faiss.Index,
    xq: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    target: float = TARGET_RECALL,
) -> SearchTuning | None:
    """The smallest effort in EFFORTS whose recall@10 for the queries `xq` (vectors not in `index`)
    reaches `target` (else the largest tried), against exact search over `blocks` (every vector of
    the index, as (ids, xb))."""
    if effort_knob(index) is None or len(xq) == 0:
        return None
    truth = exact_neighbours(xq, blocks, 10)
    if not (truth >= 0).any():
        return None  # an empty index: nothing to measure
    recall = 0.0
    effort = EFFORTS[0]
    for effort in EFFORTS:
        recall = recall_at_10(index.search(xq, 10, params=search_params(index, effort))[1], truth)
        if recall >= target:
            break
    return SearchTuning(effort_knob(index), effort, round(recall, 4), len(xq))
