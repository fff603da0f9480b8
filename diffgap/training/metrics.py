"""Retrieval metrics on paired embeddings, in both directions, and the choice of the blend weight.

query -> audio: each query has one audio target among all test audio; audio -> query: each audio
is a hit if any of its queries is retrieved.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffgap.diffusion.refiner import DEFAULT_STEPS, Refiner, blend_with_query, mix
from diffgap.training.embeddings import PairEmbeddings


def ranks_query_to_audio(xq: np.ndarray, xb: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of each query's target among all rows of xb (ties count against the query)."""
    return query_ranks(xq @ xb.T, target)


def query_ranks(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`ranks_query_to_audio` of a score matrix (Q, G)."""
    own = scores[np.arange(len(scores)), target]  # (Q,)
    return (scores > own[:, None]).sum(1) + 1


def ranks_after_rerank(
    xq: np.ndarray,
    xb: np.ndarray,
    target: np.ndarray,
    reorder: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    depth: int,
) -> np.ndarray:
    """`ranks_query_to_audio` when each query's top `depth` (by xq . xb) is reordered by
    `reorder(rows, top_ids (Q, depth), top_scores (Q, depth)) -> reordered ids`; targets below the
    top keep their rank."""
    ranks = ranks_query_to_audio(xq, xb, target)
    depth = min(depth, len(xb))
    sims = xq @ xb.T  # (Q, G)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :depth]  # (Q, depth)
    reordered = reorder(np.arange(len(xq)), top, np.take_along_axis(sims, top, axis=1))  # (Q, depth)
    for i, row in enumerate(reordered):
        hit = np.flatnonzero(row == target[i])
        if hit.size:
            ranks[i] = int(hit[0]) + 1
    return ranks


def ranks_audio_to_query(xa: np.ndarray, xq_all: np.ndarray, query_group: np.ndarray) -> np.ndarray:
    """1-based rank of the best-ranked query belonging to each audio row."""
    return audio_ranks(xa @ xq_all.T, query_group)


def audio_ranks(scores: np.ndarray, query_group: np.ndarray) -> np.ndarray:
    """`ranks_audio_to_query` of a score matrix (G, P)."""
    best_own = np.full(len(scores), -np.inf)
    np.maximum.at(best_own, query_group, scores[query_group, np.arange(len(query_group))])
    return (scores > best_own[:, None]).sum(1) + 1


def metrics(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    return {
        "R@1": float(np.mean(ranks <= 1)),
        "R@5": float(np.mean(ranks <= 5)),
        "R@10": float(np.mean(ranks <= 10)),
        "median_rank": float(np.median(ranks)),
        "MRR@10": float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0))),
        "n": int(len(ranks)),
    }


def score_mapping(
    test: PairEmbeddings,
    to_audio: Callable[[np.ndarray], np.ndarray] | None,
    from_audio: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[dict | None, dict | None]:
    """Metrics for maps into the other space (None: that direction is not available)."""
    a = metrics(ranks_query_to_audio(to_audio(test.query), test.audio, test.query_group)) if to_audio else None
    b = metrics(ranks_audio_to_query(from_audio(test.audio), test.query, test.query_group)) if from_audio else None
    return a, b


BLEND_GRID = (0.0, 0.25, 0.5, 0.75)  # 1.0 would be direct search: no refiner at all


def choose_blend(
    refiner: Refiner, val: PairEmbeddings, steps: int = DEFAULT_STEPS, grid: tuple[float, ...] = BLEND_GRID
) -> tuple[float, dict[float, float]]:
    """The blend weight with the best held-out query -> audio MRR@10 (ties: the smaller weight), and
    every weight's score. Blending needs one space for queries and audio; otherwise 0."""
    if val.query.shape[1] != val.audio.shape[1] or not len(val.query):
        return 0.0, {}
    refined = refiner.refine(val.query, steps=steps, blend=0.0)  # (Q, d), refined once for all weights
    scores: dict[float, float] = {}
    for w in grid:
        mixed = blend_with_query(refined, val.query, w)
        scores[w] = metrics(ranks_query_to_audio(mixed, val.audio, val.query_group))["MRR@10"]
    best = max(grid, key=lambda w: (scores[w], -w))
    return best, scores


def simplex_grid(parts: int, step: float = 0.25) -> list[tuple[float, ...]]:
    """Every weight vector of `parts` non-negative multiples of `step` that sum to 1."""
    units = round(1 / step)
    assert abs(units * step - 1) < 1e-9, f"step {step} must divide 1"

    def spread(left: int, slots: int) -> list[tuple[int, ...]]:
        if slots == 1:
            return [(left,)]
        return [(k, *rest) for k in range(left, -1, -1) for rest in spread(left - k, slots - 1)]

    return [tuple(k * step for k in combo) for combo in spread(units, parts)]


def choose_mix(
    val: PairEmbeddings, vectors: list[np.ndarray], direction: int = 0, step: float = 0.25
) -> tuple[tuple[float, ...], float]:
    """The weights (on a simplex grid) of several maps of the held-out rows (query rows for direction
    0, audio rows for 1, each already in the other space) whose summed cosine scores rank best by
    held-out MRR@10 (ties: the earlier grid point, which puts more weight on the first map), and
    that score."""

    def score(weights: tuple[float, ...]) -> float:
        mixed = mix(vectors, weights)
        if direction == 0:
            ranks = ranks_query_to_audio(mixed, val.audio, val.query_group)
        else:
            ranks = ranks_audio_to_query(mixed, val.query, val.query_group)
        return metrics(ranks)["MRR@10"]

    scored = [(score(w), w) for w in simplex_grid(len(vectors), step)]
    best = max(scored, key=lambda item: item[0])  # max keeps the first of equal scores
    return best[1], best[0]


LIBRARY_GRID = tuple(k / 8 for k in range(9))  # the library-side weight; 1: that part alone


def choose_library_weight(
    val: PairEmbeddings,
    mixed: np.ndarray,
    mapped: np.ndarray,
    direction: int = 0,
    grid: tuple[float, ...] = LIBRARY_GRID,
) -> tuple[float, float]:
    """The weight of the library-side part (`two_sided_scores`) with the best held-out MRR@10 (ties:
    the smaller weight), and that score. Direction 0: `mixed` (P, d) are the query-side vectors of
    the held-out queries and `mapped` (G, c) their audio mapped into the query space; direction 1:
    `mixed` (G, c) the audio rows' vectors, `mapped` (P, d) the queries mapped into audio space."""
    if direction == 0:
        query_side, raw = mixed @ val.audio.T, val.query  # (P, G)
    else:
        query_side, raw = mixed @ val.query.T, val.audio  # (G, P)
    return choose_score_weight(query_side, raw @ mapped.T, val.query_group, direction, grid)


def choose_score_weight(
    base: np.ndarray,
    other: np.ndarray,
    query_group: np.ndarray,
    direction: int = 0,
    grid: tuple[float, ...] = LIBRARY_GRID,
) -> tuple[float, float]:
    """The weight w of `other` in (1 - w) * base + w * other, two score matrices of held-out rows
    against their candidates ((P, G) queries against clips for direction 0, (G, P) for 1), with the
    best held-out MRR@10 (ties: the smaller weight), and that score."""

    def score(weight: float) -> float:
        scores = base if weight == 0 else (1 - weight) * base + weight * other
        ranks = query_ranks(scores, query_group) if direction == 0 else audio_ranks(scores, query_group)
        return metrics(ranks)["MRR@10"]

    scored = [(score(w), w) for w in grid]
    best = max(scored, key=lambda item: item[0])  # max keeps the first (smallest) of equal scores
    return best[1], best[0]
