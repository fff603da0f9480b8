"""The query path: encode any modality -> (optionally) refine toward audio space -> search -> items.

`Searcher.run` takes a batch of queries that share modality and refinement and runs each stage once
for the whole batch, so callers that micro-batch concurrent requests get batched model calls.
Decoding an uploaded file (`decode_query`) is per request and happens before batching, so a slow
upload never holds up its neighbours; encoding happens in the batch.

One rule for refinement, everywhere (CLI, service, library): a query that asks for refinement is
refined when the index has a refiner for its modality and searched directly otherwise, and its
result says which (`QueryResult.refined`). A query whose vectors live in another space than the
index's audio vectors (a CLIP video query on a CLAP index, say) cannot be searched directly: with
no refiner it fails with `NeedsRefinerError`.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from diffgap.diffusion.refiner import DEFAULT_STEPS, Refiner, is_refiner_dir, load_shared, two_sided_scores
from diffgap.diffusion.scoring import rerank, rerank_spec
from diffgap.encoders import EncoderSet, load_encoders
from diffgap.encoders.base import l2_normalize
from diffgap.index.layout import FLAT_INDEX_TYPE, REFINER_MODALITIES, refiner_dir
from diffgap.index.meaning import MeaningIndex
from diffgap.index.store import IndexStore, Item
from diffgap.media.audio import decode_audio
from diffgap.media.video import decode_video
from diffgap.models.segments import with_segment_scores

log = logging.getLogger(__name__)

QUERY_MODALITIES = ("text", "video", "audio")


class NeedsRefinerError(ValueError):
    """Query vectors from another space than the index's, and no refiner to bring them over."""


class QueryInputError(ValueError):
    """A query's input cannot be used as it is; the message says why in plain words."""


class MediaTooLongError(QueryInputError):
    """An uploaded query is longer than the service accepts."""


# An audio query shorter than this carries too little sound to search by (and is most often a mistake).
MIN_QUERY_SECONDS = 0.1


def check_text(text: str) -> str:
    """Text an encoder can read: valid Unicode (no lone surrogates) and not blank."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise QueryInputError(
            f"text contains a character that is not valid Unicode at position {exc.start} (a lone surrogate?)"
        ) from None
    if not text.strip():
        raise QueryInputError("text must not be empty")
    return text


@dataclass(frozen=True)
class ItemFilter:
    """Metadata conditions an item must meet; None fields are not checked."""

    path_prefix: str | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (key, substring), case-insensitive
    description: str | None = None  # every word must occur in the item's description
    exclude_path: str | None = None  # not this file ("more like this" leaves out the example itself)

    def matches(self, item: Item) -> bool:
        if self.path_prefix and not item.path.startswith(self.path_prefix):
            return False
        if self.exclude_path is not None and item.path == self.exclude_path:
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

    steps: int = DEFAULT_STEPS
    mode: str = "sample"
    blend: float | None = None  # None: the refiner's own weight, chosen when it was trained
    start_noise: float | None = None  # None: 0 (the prior's mean) for sample, 1 for bridge
    rerank: bool = False  # reorder the top RERANK of the refined ranking with the refiner's denoising error

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `Refiner.refine`."""
        return {"steps": self.steps, "mode": self.mode, "blend": self.blend, "start_noise": self.start_noise}


@dataclass
class Query:
    """One query: exactly one of `text`, `vector` (already in the modality's encoder space) or `media`
    (a decoded wave (S,) for audio, frames (T, H, W, 3) for video; see `decode_query`)."""

    modality: str  # "text" | "video" | "audio"
    k: int
    text: str | None = None
    vector: np.ndarray | None = None
    media: np.ndarray | None = None
    refine: RefineSpec | None = None
    filter: ItemFilter | None = None
    lexical: bool = False  # fuse in the rankings of the files' words (text queries; see `rank`)
    lexical_weight: float = 1.0  # the words' weight in the fusion (`fuse`); 0 leaves the sound order
    meaning: bool = True  # with lexical: match the words by meaning too, not only exactly (if the index can)
    collapse: bool = True  # one hit per file (its best window), and per content (duplicates listed)
    effort: int | None = None  # an approximate index's search effort (efSearch/nprobe); None: its tuned default

    def __post_init__(self) -> None:
        assert self.modality in QUERY_MODALITIES, f"modality {self.modality!r} not in {QUERY_MODALITIES}"
        given = sum(x is not None for x in (self.text, self.vector, self.media))
        assert given == 1, "a query needs exactly one of text, vector or media"

    @property
    def needs_encoding(self) -> bool:
        return self.vector is None

    @property
    def batch_key(self) -> tuple[str, RefineSpec | None, bool]:
        return self.modality, self.refine, self.needs_encoding


@dataclass
class Hit:
    item: Item
    score: float  # cosine of the (refined) query vector with this window; mixed with two-sided and segment scores
    rank_score: float | None = None  # the fused score hits were ordered by, when words took part
    dense_rank: int | None = None  # place in the dense ranking of the candidates (1 = best)
    lexical_rank: int | None = None  # place of its file in the full-text ranking, if its words matched
    meaning_rank: int | None = None  # place of its file among the files whose words mean most like the text
    windows: int = 1  # windows of this file among the candidates, when collapsed to its best
    duplicates: tuple[str, ...] = ()  # other files with the same bytes, when collapsed


@dataclass
class QueryResult:
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch
    refined: bool = False


class Searcher:
    """An open index, its encoders and refiners (by query modality)."""

    def __init__(
        self,
        store: IndexStore,
        encoders: EncoderSet,
        refiners: dict[str, Refiner] | None = None,
        meaning: MeaningIndex | None = None,
    ) -> None:
        self.store = store
        self.encoders = encoders
        self.refiners: dict[str, Refiner] = refiners or {}
        self.meaning = meaning  # the files' words by meaning; None: words match exactly only
        # per two-sided refiner: the windows' audio mapped into the query space, filled at start or as
        # candidates come up (a fixed index's vectors do not change under a searcher)
        self._library: weakref.WeakKeyDictionary[Refiner, MappedWindows] = weakref.WeakKeyDictionary()
        # and per refiner whose spans have a library side: the windows' spans mapped into the query space
        self._library_spans: weakref.WeakKeyDictionary[Refiner, MappedWindows] = weakref.WeakKeyDictionary()

    def query_dim(self, modality: str) -> int:
        return self.encoders.for_modality(modality).dim

    def effective_refine(self, modality: str, spec: RefineSpec | None) -> RefineSpec | None:
        """The module's one rule: asked-for refinement runs when a refiner for the modality exists."""
        return spec if spec is not None and modality in self.refiners else None

    def run(self, queries: Sequence[Query]) -> list[QueryResult]:
        """Queries that share a batch key; returns one result per query, in order."""
        assert queries, "empty batch"
        modality = queries[0].modality
        assert all(q.modality == modality and q.refine == queries[0].refine for q in queries), "mixed batch"
        spec = self.effective_refine(modality, queries[0].refine)
        timings: dict[str, float] = {}
        segment_weight = self._segment_weight(modality, spec)
        t0 = time.perf_counter()
        xq, spans = self._encode(modality, queries, self.store.manifest.segments if segment_weight else 0)  # (B, c)
        if any(q.needs_encoding for q in queries):
            timings["encode"] = (time.perf_counter() - t0) * 1e3
        raw, raw_spans = xq, spans  # the queries as encoded: what a rerank and the library sides read
        if spec is not None:
            t1 = time.perf_counter()
            refiner = self.refiners[modality]
            adapted = None
            if spec.blend is None and refiner.reads_text and all(q.text is not None for q in queries):
                adapted = refiner.adapt([check_text(q.text) for q in queries])  # (B, d) its reading of the words
            if spans is None:
                xq = refiner.refine(xq, direction=0, adapted=adapted, **spec.options())
            else:  # each span taken toward audio space as the query is, in the same call
                xq, spans = refiner.refine_with_spans(xq, spans, direction=0, **spec.options())  # (B, d), (B, S, d)
            timings["refine"] = (time.perf_counter() - t1) * 1e3
        else:
            self._check_direct(modality, xq)
        t_words = time.perf_counter()
        words = self._words(queries)
        if any(w is not None for w in words):
            timings["words"] = (time.perf_counter() - t_words) * 1e3
        t2 = time.perf_counter()
        reorder = rescore = None
        if spec is not None and spec.rerank:

            def reorder(i: int, hits: list[Hit]) -> list[Hit]:
                return self._rerank(self.refiners[modality], raw[i], hits)

        two_sided = spec is not None and spec.blend is None and self.refiners[modality].two_sided
        if two_sided or spans is not None:

            def rescore(i: int, hits: list[Hit]) -> list[Hit]:
                if two_sided:
                    hits = self._two_sided(self.refiners[modality], raw[i], hits)
                if spans is not None:
                    hits = self._with_segments(self.refiners[modality], spans[i], raw_spans[i], hits, segment_weight)
                return hits

        hits = self.search_vectors(xq, queries, reorder, words, rescore)
        timings["search"] = (time.perf_counter() - t2) * 1e3
        return [QueryResult(h, timings, spec is not None) for h in hits]

    def search(self, query: Query) -> QueryResult:
        """One query on its own (CLI, notebooks); services batch through `run`."""
        return self.run([query])[0]

    def _words(self, queries: Sequence[Query]) -> list[WordRankings | None]:
        """Each text query's word rankings (exact and by meaning; the meaning side batched), or None."""
        wanted = [i for i, q in enumerate(queries) if q.lexical and q.text]
        out: list[WordRankings | None] = [None] * len(queries)
        by_meaning = [i for i in wanted if queries[i].meaning and self.meaning is not None]
        rows = self.meaning.scores([queries[i].text for i in by_meaning]) if by_meaning else []  # (B', N)
        row_of = dict(zip(by_meaning, rows, strict=True))
        for i in wanted:
            exact = self.store.lexical_search(match_expression(queries[i].text))
            row = row_of.get(i)
            out[i] = WordRankings(exact, self.meaning, row) if row is not None else WordRankings(exact)
        return out

    def _encode(
        self, modality: str, queries: Sequence[Query], segments: int = 0
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The queries' vectors (B, c) and, with `segments` > 0 and every query given as media, their
        time spans (B, segments, c) from the same pass; None otherwise (a vector has no spans)."""
        raw = [check_text(q.text) if q.text is not None else q.media for q in queries if q.needs_encoding]
        encoder = self.encoders.for_modality(modality)
        spans = None
        if segments and raw and len(raw) == len(queries):
            encoded_rows, spans = encoder.encode_with_segments(raw, segments)  # (B, c), (B, S, c)
        else:
            encoded_rows = encoder.encode(raw) if raw else ()
        encoded = iter(encoded_rows)
        xq = np.stack([next(encoded) if q.needs_encoding else q.vector for q in queries])  # (B, c)
        return l2_normalize(np.asarray(xq, dtype=np.float32)), spans

    def segment_weight(self, modality: str) -> float:
        """The weight of the time-segment score for refined queries of `modality`: its refiner's, when
        the index keeps as many spans per window as the weight was picked with; else 0."""
        refiner = self.refiners.get(modality)
        if refiner is None or refiner.config.segments != self.store.manifest.segments:
            return 0.0
        return refiner.config.segment_weight

    def _segment_weight(self, modality: str, spec: RefineSpec | None) -> float:
        """`segment_weight` for a batch refined with no blend named (as the library side); else 0."""
        return 0.0 if spec is None or spec.blend is not None else self.segment_weight(modality)

    def _check_direct(self, modality: str, xq: np.ndarray) -> None:
        query_space = self.encoders.for_modality(modality).fingerprint.space
        if xq.shape[1] != self.store.manifest.dim or query_space != self.encoders.audio.fingerprint.space:
            raise NeedsRefinerError(
                f"{modality} queries ({xq.shape[1]}-d, another space than this index's "
                f"{self.store.manifest.dim}-d audio vectors) need a {modality} refiner, and this index has none; "
                f"train one with `diffgap-index refiner train --modality {modality}`"
            )

    def search_vectors(
        self,
        xq: np.ndarray,
        queries: Sequence[Query],
        reorder: Callable[[int, list[Hit]], list[Hit]] | None = None,
        words: Sequence[WordRankings | None] | None = None,
        rescore: Callable[[int, list[Hit]], list[Hit]] | None = None,
    ) -> list[list[Hit]]:
        """Top hits of each row of xq (already in audio space): each query's filter, `rescore(query
        index, candidates)` (new scores, best first), collapse, word fusion, `reorder(query index,
        ranking)` and k applied. Searches deeper while a query that narrows its candidates is short."""
        ntotal = self.store.ntotal
        if ntotal == 0:
            return [[] for _ in queries]
        narrowing = (
            reorder is not None
            or rescore is not None
            or any(q.filter is not None or q.collapse or q.lexical for q in queries)
        )
        want = max(q.k for q in queries)
        depth = min(ntotal, max(want * 10, CANDIDATES) if narrowing else want)
        efforts = [q.effort for q in queries if q.effort is not None]
        effort = max(efforts) if efforts else None  # one search for the batch: the most asked for serves all
        while True:
            scores, ids = self.store.search(xq, depth, effort)
            items = self.store.items(int(i) for i in np.unique(ids) if i >= 0)
            out = []
            for i, (q, x, srow, irow) in enumerate(zip(queries, xq, scores, ids, strict=True)):
                dense = [Hit(items[int(j)], float(s)) for s, j in zip(srow, irow, strict=True) if int(j) in items]
                again = (lambda hits, i=i: rescore(i, hits)) if rescore else None
                out.append(self.rank(q, x, dense, words[i] if words else None, again))
            short = any(len(r) < q.k for r, q in zip(out, queries, strict=True) if q.filter is not None or q.collapse)
            if not short or depth >= ntotal:  # reordered once, on the ranking that is kept
                return [
                    (reorder(i, r) if reorder else r)[: q.k] for i, (r, q) in enumerate(zip(out, queries, strict=True))
                ]
            depth = min(ntotal, depth * 4)  # a selective filter or many windows per file: look deeper

    def _rerank(self, refiner: Refiner, raw: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """The first RERANK.depth hits of a ranking reordered by the refiner's denoising error of each
        hit's window, conditioned on the raw query `raw` (c,) and fused with the hit's score by the
        refiner's weight (`rerank_spec`, diffgap/diffusion/scoring.py); the rest keep their places.
        A weight of 0 (the held-out pairs found no gain) leaves the ranking as it is, at no cost."""
        spec = rerank_spec(refiner)
        head, tail = hits[: spec.depth], hits[spec.depth :]
        if len(head) < 2 or spec.weight == 0:
            return hits
        xb = self._vectors_of(head)  # (K, d)
        scores = np.asarray([[h.score for h in head]], dtype=np.float32)  # (1, K)
        order = rerank(refiner, raw[None], np.arange(len(head))[None], xb[None], spec, scores)[0]
        return [head[i] for i in order] + tail

    def _vectors_of(self, hits: list[Hit]) -> np.ndarray:
        """The stored audio vectors (K, d) of the hits' windows, in hit order."""
        ids = np.asarray([h.item.id for h in hits], dtype=np.int64)
        found, xb = self.store.vectors(ids)  # (K,), (K, d) in id order
        return xb[np.searchsorted(found, ids)]  # (K, d) in hit order

    def warm_library(self) -> dict[str, int]:
        """Map every window (and its spans, for a refiner whose spans have a library side) into the
        query space for each two-sided refiner now, when the index holds no more than LIBRARY_KEPT
        (`_spans_capacity`) of them, so that no query pays for its candidates' first mapping; returns the
        windows mapped, by the name of each refiner that mapped any. Larger indexes map their
        candidates as queries bring them up."""
        done: dict[str, int] = {}
        for name, refiner in self.refiners.items():
            clips = refiner.two_sided and self.store.ntotal <= LIBRARY_KEPT
            spans = self._serves_span_library(refiner) and self.store.ntotal <= self._spans_capacity(refiner)
            if not clips and not spans:
                continue
            for ids, xb in self.store.iter_vectors(batch=1024):  # (B,), (B, d)
                if clips:
                    self._library.setdefault(refiner, MappedWindows()).add(ids.tolist(), refiner.map_library(xb))
                if spans and (xb_spans := self.store.segment_vectors(ids)) is not None:  # (B, S, d)
                    mapped = refiner.map_library_spans(xb_spans).reshape(len(ids), -1)  # (B, S * c)
                    self._kept_spans(refiner).add(ids.tolist(), mapped)
                done[name] = done.get(name, 0) + len(ids)
        return done

    def _spans_capacity(self, refiner: Refiner) -> int:
        """How many windows' spans mapped back into `refiner`'s query space (manifest.segments x its
        query dim, float16) SPANS_KEPT_BYTES holds."""
        return SPANS_KEPT_BYTES // max(1, self.store.manifest.segments * refiner.dims(0)[1] * 2)

    def _kept_spans(self, refiner: Refiner) -> MappedWindows:
        """The windows' spans mapped back for `refiner`, made on first use only (not on every query)."""
        kept = self._library_spans.get(refiner)
        if kept is None:
            kept = self._library_spans.setdefault(refiner, MappedWindows(self._spans_capacity(refiner), np.float16))
        return kept

    def _serves_span_library(self, refiner: Refiner) -> bool:
        """Whether searches with `refiner` score the spans' library side: it has a weight, and the index
        keeps as many spans per window as the refiner's weights were picked with."""
        return refiner.spans_two_sided and refiner.config.segments == self.store.manifest.segments

    def _two_sided(self, refiner: Refiner, raw: np.ndarray, hits: list[Hit]) -> list[Hit]:
        """Candidates rescored with the refiner's library side: each window's audio mapped into the
        query space (once per window while the searcher lives) against the query as encoded, `raw`
        (c,), mixed with the query-side score (`two_sided_scores`); best first."""
        if not hits:
            return hits
        kept = self._library.setdefault(refiner, MappedWindows())
        ids = [h.item.id for h in hits]
        xb_mapped, missing = kept.get(ids, len(raw))  # (K, c), rows of windows not yet mapped left at zero
        if missing:
            new = refiner.map_library(self._vectors_of([hits[i] for i in missing]))  # (M, c)
            kept.add([ids[i] for i in missing], new)
            xb_mapped[missing] = new
        query_side = np.asarray([[h.score for h in hits]], dtype=np.float32)  # (1, K)
        scores = two_sided_scores(query_side, raw[None], xb_mapped, refiner.config.library_weight)[0]  # (K,)
        for h, s in zip(hits, scores, strict=True):
            h.score = float(s)
        return sorted(hits, key=lambda h: -h.score)

    def _with_segments(
        self, refiner: Refiner, spans: np.ndarray, raw_spans: np.ndarray, hits: list[Hit], weight: float
    ) -> list[Hit]:
        """Candidates rescored with the time-segment score (`Refiner.span_scores`) of the query's spans
        taken to audio space (S, d) against each window's, with the spans' library side where the
        refiner has one (the query's spans as encoded (S, c) against each window's mapped back, once
        per window while the searcher lives); best first. Left as they are where a window has no spans."""
        ids = [h.item.id for h in hits]
        xb_spans = self.store.segment_vectors(np.asarray(ids, dtype=np.int64))  # (K, S, d)
        if xb_spans is None:
            return hits
        mapped = None
        if refiner.spans_two_sided:
            kept = self._kept_spans(refiner)
            k, s, _ = xb_spans.shape
            flat, missing = kept.get(ids, s * len(raw_spans[0]))  # (K, S * c), rows not yet mapped at zero
            if missing:
                new = refiner.map_library_spans(xb_spans[missing]).reshape(len(missing), -1)  # (M, S * c)
                kept.add([ids[i] for i in missing], new)
                flat[missing] = new.astype(kept.dtype)  # as a later query reads them back
            mapped = flat.reshape(k, s, -1)  # (K, S, c)
        span = refiner.span_scores(spans[None], raw_spans[None], xb_spans, mapped)  # (1, K)
        scores = np.asarray([[h.score for h in hits]], dtype=np.float32)  # (1, K)
        mixed = with_segment_scores(scores, span, weight)[0]  # (K,)
        for h, score in zip(hits, mixed, strict=True):
            h.score = float(score)
        return sorted(hits, key=lambda h: -h.score)

    def rank(
        self,
        query: Query,
        x: np.ndarray,
        dense: list[Hit],
        words: WordRankings | None = None,
        rescore: Callable[[list[Hit]], list[Hit]] | None = None,
    ) -> list[Hit]:
        """Dense candidates (best first) -> the query's ranking.

        With `lexical`, the files the words rank (`WordRankings`: exact full-text matches, and the files
        whose words mean most like the text) join the candidates, scored against x window by window,
        and hits are ordered by `fuse`. Files no word ranking holds keep their dense order, so a
        library whose names say nothing ranks as dense search does. `rescore` gives the candidates
        their final dense scores (a two-sided refiner), best first."""
        hits = [h for h in dense if query.filter is None or query.filter.matches(h.item)]
        if words is None and query.lexical and query.text:
            words = self._words([query])[0]
        if words is not None and not words.empty:
            have = {h.item.path for h in hits}
            hits += self._windows_of([p for p in words.paths() if p not in have], x, query)
            hits.sort(key=lambda h: -h.score)
        if rescore is not None:
            hits = rescore(hits)
        if query.collapse:
            hits = collapse_files(hits)
        for r, h in enumerate(hits, 1):
            h.dense_rank = r
        if words is not None and not words.empty:
            hits = fuse(hits, words, query.lexical_weight)
        return collapse_duplicates(hits) if query.collapse else hits

    def _windows_of(self, paths: list[str], x: np.ndarray, query: Query) -> list[Hit]:
        """Every window of these files, scored against x (files that only their words brought in)."""
        ids = [i for group in self.store.item_ids_of(paths).values() for i in group]
        if not ids:
            return []
        found, xb = self.store.vectors(np.asarray(ids, dtype=np.int64))
        items = self.store.items(found)
        hits = [Hit(items[int(i)], float(s)) for i, s in zip(found, xb @ x, strict=True)]
        return [h for h in hits if query.filter is None or query.filter.matches(h.item)]


CANDIDATES = 100  # dense candidates a narrowing query starts from


class MappedWindows:
    """Windows' audio vectors (or spans, flattened) mapped into a two-sided refiner's query space,
    kept by item id in blocks of `dtype` (no per-row objects) and at most `limit` (default
    LIBRARY_KEPT) of them: past that it starts over rather than grow. Safe to share between the
    threads of a server."""

    BLOCK = 8192  # rows per block

    def __init__(self, limit: int | None = None, dtype: type[np.floating] = np.float32) -> None:
        self.limit, self.dtype = limit, dtype
        self._lock = threading.Lock()
        self._blocks: list[np.ndarray] = []  # (BLOCK, c) each
        self._row_of: dict[int, int] = {}  # item id -> row over the blocks

    def __len__(self) -> int:
        return len(self._row_of)

    def get(self, ids: list[int], dim: int) -> tuple[np.ndarray, list[int]]:
        """The kept rows of `ids` (K, dim) (zeros where none) and the positions in `ids` that have none."""
        with self._lock:
            rows = [self._row_of.get(i) for i in ids]
            out = np.zeros((len(ids), dim), np.float32)  # float32 whatever the blocks keep
            for k, r in enumerate(rows):
                if r is not None:
                    out[k] = self._blocks[r // self.BLOCK][r % self.BLOCK]
        return out, [k for k, r in enumerate(rows) if r is None]

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        """Keep `vectors` (M, c) as the rows of `ids`."""
        with self._lock:
            if len(self._row_of) + len(ids) > (LIBRARY_KEPT if self.limit is None else self.limit):
                self._blocks, self._row_of = [], {}
            for i, v in zip(ids, vectors, strict=True):
                if i in self._row_of:
                    continue
                n = len(self._row_of)
                if n == len(self._blocks) * self.BLOCK:
                    self._blocks.append(np.empty((self.BLOCK, len(v)), self.dtype))
                self._blocks[n // self.BLOCK][n % self.BLOCK] = v
                self._row_of[i] = n


# windows whose library-side vectors a searcher keeps per two-sided refiner (~1.5 KB of memory each at 256-d):
# a query whose 100 candidates are new pays ~5 ms to map them, 100 kept ones ~0.3 ms (BENCHMARKS.md run 11)
LIBRARY_KEPT = 200_000
# and the memory for the spans' library side it keeps per refiner, in float16 (the precision the index
# stores spans in): 8 spans of 256 floats are 4 KB a window, so ~100,000 windows; mapping 100 new
# candidates' 800 spans costs ~14 ms a query on one core, 100 kept ones ~0.9 ms (BENCHMARKS.md run 21)
SPANS_KEPT_BYTES = 400 * 1024 * 1024
MEANING_DEPTH = 100  # files the meaning ranking contributes to a query's candidates
# The fusion's weights, chosen on a library of Debian sound packages and queries other than the ones
# the benchmark reports (bench/reallib_design_queries.json; BENCHMARKS.md, "A real library"):
EXACT_WEIGHT = 0.5  # an exact word match, best of the query = 1, next to the meaning cosine (in [-1, 1])
DENSE_WEIGHT = 0.05  # one standard deviation of sound score above the candidates' mean, in the same units
STOPWORDS = frozenset(
    ["a", "an", "the", "of", "in", "on", "at", "to", "for", "with", "and", "or", "is", "are", "was", "by",
     "from", "into", "onto", "its", "it", "this", "that"]
)  # fmt: skip


@dataclass
class WordRankings:
    """What one text query's words make of every file: exact full-text matches (bm25, higher is better)
    and, when the index has a sentence model, the cosine of the text with every file's description."""

    exact: list[tuple[str, float]]
    meaning_index: MeaningIndex | None = None
    meaning_row: np.ndarray | None = None  # (N,) cosines, in meaning_index.paths order
    meaning: list[tuple[str, float]] = field(init=False)  # the MEANING_DEPTH nearest files, best first
    exact_share: dict[str, float] = field(init=False)  # bm25 / the query's best bm25

    def __post_init__(self) -> None:
        self.meaning = self.meaning_index.nearest(self.meaning_row, MEANING_DEPTH) if self.meaning_index else []
        top = max((s for _, s in self.exact), default=0.0)
        self.exact_share = {p: s / top for p, s in self.exact} if top > 0 else {}

    @property
    def empty(self) -> bool:
        return not self.exact and not self.meaning

    def paths(self) -> list[str]:
        """The files the words bring into the candidates: every exact match, the nearest by meaning."""
        return list(dict.fromkeys([p for p, _ in self.exact] + [p for p, _ in self.meaning]))

    def score(self, path: str) -> float:
        """meaning cosine + EXACT_WEIGHT x (bm25 / the query's best bm25)."""
        row = self.meaning_index.row_of.get(path) if self.meaning_index else None
        meaning = float(self.meaning_row[row]) if row is not None else 0.0  # type: ignore[index]
        return meaning + EXACT_WEIGHT * self.exact_share.get(path, 0.0)


def fuse(hits: list[Hit], words: WordRankings, weight: float) -> list[Hit]:
    """Order hits (dense ranks set) by weight x words score + DENSE_WEIGHT x how far the file's sound
    score stands above the candidates' mean (in standard deviations; a bonus, never a penalty), and
    say where each stood in the exact and meaning rankings. Scores, not ranks, are fused: a file whose
    words match the text stays on top however weak its sound score (reciprocal rank fusion pushed it
    below files that two weak rankings agreed on). Files whose words are equal keep their sound order
    (the sort is stable), so a library whose names say nothing ranks as dense search does."""
    exact, meant = tied_ranks(words.exact), tied_ranks(words.meaning)
    sound = np.asarray([h.score for h in hits], dtype=np.float64)
    spread = sound.std()
    z = (sound - sound.mean()) / spread if spread > 1e-9 else np.zeros_like(sound)
    for h, zi in zip(hits, z, strict=True):
        h.lexical_rank, h.meaning_rank = exact.get(h.item.path), meant.get(h.item.path)
        h.rank_score = weight * words.score(h.item.path) + DENSE_WEIGHT * max(0.0, float(zi))
    return sorted(hits, key=lambda h: -h.rank_score)


def match_expression(text: str | None) -> str:
    """An FTS5 query matching any of the text's words (quoted, so no word is read as an operator)."""
    words = [w for w in re.findall(r"[^\W_]+", (text or "").lower()) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def tied_ranks(scored: list[tuple[str, float]]) -> dict[str, int]:
    """1-based ranks of (key, score) pairs, best first; equal scores share the better rank."""
    ranks: dict[str, int] = {}
    ordered = sorted(scored, key=lambda kv: -kv[1])
    for i, (key, score) in enumerate(ordered):
        tie = i > 0 and math.isclose(score, ordered[i - 1][1], rel_tol=1e-9, abs_tol=1e-12)
        ranks[key] = ranks[ordered[i - 1][0]] if tie else i + 1
    return ranks


def collapse_files(hits: list[Hit]) -> list[Hit]:
    """One hit per file, its best window (hits come best first), counting the file's windows."""
    best: dict[str, Hit] = {}
    for h in hits:
        if h.item.path in best:
            best[h.item.path].windows += 1
        else:
            best[h.item.path] = h
    return list(best.values())


def collapse_duplicates(hits: list[Hit]) -> list[Hit]:
    """One hit per content hash: files with the same bytes are listed on the best-ranked one."""
    first: dict[str, Hit] = {}
    out: list[Hit] = []
    for h in hits:
        digest = h.item.content_hash
        if digest and digest in first:
            keep = first[digest]
            keep.duplicates = (*keep.duplicates, h.item.path)
            continue
        if digest:
            first[digest] = h
        out.append(h)
    return out


def decode_query(
    source: str | Path | BinaryIO, modality: str, encoders: EncoderSet, *, max_seconds: float | None = None
) -> np.ndarray:
    """An audio or video query, decoded for its encoder (`Query.media`). Raises the media module's
    decode errors for unreadable input, and MediaTooLongError past `max_seconds` (None: no limit,
    only the start the encoder reads is decoded)."""
    encoder = encoders.for_modality(modality)
    if modality == "audio":
        limit = encoder.max_seconds if max_seconds is None else max_seconds + 1
        audio = decode_audio(source, encoder.sample_rate, max_seconds=limit)
        if max_seconds is not None and audio.duration > max_seconds:
            raise MediaTooLongError(f"audio is longer than {max_seconds} s")
        if audio.duration < MIN_QUERY_SECONDS:
            have, need = audio.duration * 1000, MIN_QUERY_SECONDS * 1000
            raise QueryInputError(f"audio is {have:.0f} ms long; a query needs at least {need:.0f} ms")
        return audio.wave[: int(encoder.max_seconds * encoder.sample_rate)]
    assert modality == "video", f"only audio and video queries are decoded, not {modality!r}"
    limit = None if max_seconds is None else max_seconds + 1
    frames = decode_video(source, encoder.fps, size=getattr(encoder, "size", None), max_seconds=limit)
    if max_seconds is not None and len(frames) / encoder.fps > max_seconds:
        raise MediaTooLongError(f"video is longer than {max_seconds} s")
    return frames


def open_searcher(
    index_dir: str | Path, *, video_encoder: str | None = None, mmap: bool = False, need_text: bool = True
) -> Searcher:
    """Open an index read-only with its encoders and every refiner found beside it, each checked against
    the encoders it will run with. A video refiner names the video encoder it was trained with, which
    is loaded when no `video_encoder` is given."""
    store = IndexStore.open(index_dir, readonly=True)
    try:
        encoders = load_encoders(store.manifest.encoder_spec, video_encoder, need_text=need_text)
        store.check_fingerprint(encoders.audio.fingerprint)
        refiners: dict[str, Refiner] = {}
        for modality in REFINER_MODALITIES:
            path = refiner_dir(index_dir, modality)
            if not is_refiner_dir(path):
                continue
            refiner = load_shared(path)  # an unchanged refiner is not loaded (and traced) again
            trained_with = refiner.config.training.get("video_encoder_spec")
            if modality == "video" and encoders.video is None and trained_with:
                encoders.video = load_encoders(trained_with, need_text=False).video
            if modality == "text" and encoders.text is None:
                continue  # a caller that reads no text (audio search from the CLI) needs no text refiner
            refiner.check_against(encoders)
            refiners[modality] = refiner
        store.vector_index(mmap=mmap and store.manifest.current_type == FLAT_INDEX_TYPE)
        meaning = MeaningIndex.load(store) if need_text else None
    except BaseException:
        store.close()
        raise
    return Searcher(store, encoders, refiners, meaning)
