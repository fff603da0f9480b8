"""Request and response models of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffgap.diffusion.refiner import DEFAULT_STEPS
from diffgap.index.store import Item
from diffgap.index.vectors import MAX_EFFORT
from diffgap.retrieval.search import Hit, ItemFilter, QueryInputError, RefineSpec, check_text

REFINE_DESCRIPTION = (
    "refine the query toward audio space with the index's DiffGAP refiner for its modality; an index "
    "without one searches directly, and the response's `refined` says which happened"
)


class RefineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refine: bool = Field(True, description=REFINE_DESCRIPTION)
    steps: int | None = Field(
        None,
        ge=1,
        le=200,
        description=f"DDIM sampling steps; default: the server's DIFFGAP_DEFAULT_STEPS ({DEFAULT_STEPS})",
    )
    mode: Literal["sample", "bridge"] = "sample"
    blend: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="weight of the direct similarity in the final score; default: the refiner's own, "
        "picked on held-out pairs when it was trained",
    )
    start_noise: float | None = Field(
        None, ge=0.0, le=1.0, description="starting noise scale; default 0 (prior mean) for sample, 1 for bridge"
    )
    rerank: bool = Field(
        False,
        description="also reorder the top 50 of the refined ranking by how well the refiner denoises each hit "
        "given the query (its likelihood), fused with the score by the weight the refiner's held-out pairs "
        "picked (`/readyz` refiners.rerank_weight; 0: no gain there, and the ranking stays as it is); up to "
        "~6 ms more per query (BENCHMARKS.md runs 6 and 20). Needs a refiner, like `refine`",
    )

    def refine_spec(self, default_steps: int) -> RefineSpec | None:
        if not self.refine:
            return None
        return RefineSpec(self.steps or default_steps, self.mode, self.blend, self.start_noise, self.rerank)


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path_prefix: str | None = Field(None, max_length=1000, description="only items whose path starts with this")
    min_duration: float | None = Field(None, ge=0)
    max_duration: float | None = Field(None, ge=0)
    tags: dict[str, str] | None = Field(None, description="tag key -> substring the tag value must contain")
    description: str | None = Field(None, max_length=500, description="words the item description must contain")

    @staticmethod
    def to_item_filter(filters: Filters | None) -> ItemFilter | None:
        if filters is None:
            return None
        tags = tuple(sorted((filters.tags or {}).items()))
        return ItemFilter(filters.path_prefix, filters.min_duration, filters.max_duration, tags, filters.description)


class RankOptions(BaseModel):
    lexical: bool = Field(
        True,
        description="also rank files by their words (name, tags, folders: exactly, full-text bm25, and by meaning "
        "when the index has a sentence model) and fuse that with the sound ranking (reciprocal rank fusion); "
        "files no word ranking holds keep the sound order",
    )
    lexical_weight: float = Field(1.0, ge=0.0, le=10.0, description="weight of the word rankings in the fusion")
    meaning: bool = Field(
        True, description='with lexical: match the words by meaning too ("gunshot" finds musket.ogg), not only exactly'
    )
    collapse: bool = Field(
        True, description="one hit per file (its best window) and per content (byte-identical files listed)"
    )
    search_effort: int | None = Field(
        None,
        ge=1,
        le=MAX_EFFORT,
        description="approximate indexes: candidates explored (HNSW efSearch, IVF nprobe); more is slower and finds "
        "more of the true nearest items. Default: the value tuned when the index was built for recall@10 >= 0.95 "
        "(/readyz shows it). Exact indexes ignore it",
    )

    def ranking(self) -> dict[str, Any]:
        """The Query fields these options set."""
        return {
            "lexical": self.lexical,
            "lexical_weight": self.lexical_weight,
            "meaning": self.meaning,
            "collapse": self.collapse,
            "effort": self.search_effort,
        }


class SearchRequest(RefineOptions, RankOptions):
    text: str | None = Field(None, description="a text query (exactly one of text, embedding or item_id)")
    embedding: list[float] | None = Field(None, description="a query vector in the query encoder's space")
    item_id: int | None = Field(
        None, ge=0, le=2**63 - 1, description="more like this: search by an indexed item's own sound, its file left out"
    )
    k: int = Field(10, ge=1, le=10_000)
    filters: Filters | None = None

    @field_validator("embedding")
    @classmethod
    def finite(cls, v: list[float] | None) -> list[float] | None:
        # checked as float32, the type they are searched in: 1e39 is finite in JSON, inf in float32
        if v is not None and not np.isfinite(np.asarray(v, dtype=np.float64).astype(np.float32)).all():
            raise ValueError("embedding must contain only finite numbers that fit in float32 (|x| < 3.4e38)")
        return v

    @field_validator("text")
    @classmethod
    def readable_text(cls, v: str | None) -> str | None:
        return v if v is None else check_text(v)  # its QueryInputError is a ValueError: a 422

    @model_validator(mode="after")
    def exactly_one(self) -> SearchRequest:
        if sum(x is not None for x in (self.text, self.embedding, self.item_id)) != 1:
            raise ValueError("give exactly one of 'text', 'embedding' or 'item_id'")
        return self


class BatchSearchRequest(RefineOptions, RankOptions):
    texts: list[str] = Field(..., min_length=1)
    k: int = Field(10, ge=1, le=10_000)
    filters: Filters | None = None

    @field_validator("texts")
    @classmethod
    def readable_texts(cls, v: list[str]) -> list[str]:
        for i, text in enumerate(v):
            try:
                check_text(text)
            except QueryInputError as exc:
                raise ValueError(f"texts[{i}]: {exc}") from None
        return v


class ItemOut(BaseModel):
    id: int
    path: str
    start: float
    end: float
    duration: float | None
    sample_rate: int | None
    tags: dict[str, Any]
    description: str = Field("", description="words from the file's tags and name")
    audio_url: str
    waveform_url: str = Field(description="a PNG of the whole file with this window highlighted")

    @classmethod
    def from_item(cls, item: Item, **extra: Any) -> ItemOut:
        return cls(
            id=item.id,
            path=item.path,
            start=item.start,
            end=item.end,
            duration=item.duration,
            sample_rate=item.sample_rate,
            tags=item.tags,
            description=item.description,
            audio_url=f"/v1/items/{item.id}/audio",
            waveform_url=f"/v1/items/{item.id}/waveform.png",
            **extra,
        )


class HitOut(ItemOut):
    score: float = Field(
        description="cosine of the (refined) query with this window; with a refiner that weighs the library "
        "side, that score mixed with the query's cosine to the window mapped into the query's space"
    )
    rank: int
    dense_rank: int | None = Field(None, description="place in the sound ranking of the candidates")
    lexical_rank: int | None = Field(None, description="place of the file in the word ranking, when its words matched")
    meaning_rank: int | None = Field(
        None, description="place of the file among those whose words mean most like the query, when it is one"
    )
    windows: int = Field(1, description="windows of this file among the candidates (collapsed to the best)")
    duplicates: list[str] = Field(default_factory=list, description="other files with the same bytes")

    @classmethod
    def from_hits(cls, hits: list[Hit]) -> list[HitOut]:
        return [
            cls.from_item(
                h.item,
                score=h.score,
                rank=r + 1,
                dense_rank=h.dense_rank,
                lexical_rank=h.lexical_rank,
                meaning_rank=h.meaning_rank,
                windows=h.windows,
                duplicates=list(h.duplicates),
            )
            for r, h in enumerate(hits)
        ]


class SearchResponse(BaseModel):
    results: list[HitOut]
    refined: bool
    timings_ms: dict[str, float]


class BatchSearchResponse(BaseModel):
    results: list[list[HitOut]]
    refined: bool
    timings_ms: dict[str, float]


class ReadyOut(BaseModel):
    ready: bool
    items: int
    dim: int
    encoder: str
    index_type: str = Field(description="what the index was built with: auto or a FAISS factory string")
    faiss_type: str = Field("", description="the FAISS index as it stands (auto: Flat or HNSW32 by size)")
    search: dict[str, Any] = Field(
        default_factory=dict,
        description="an approximate index's default search effort and its measured recall@10; empty when exact",
    )
    refiners: dict[str, dict[str, Any]]
    video: bool
    lexical: bool = Field(False, description="the index has a full-text index of its files' words")
    meaning: str | None = Field(None, description="the sentence model that matches the files' words by meaning, if any")
    max_upload_bytes: int = Field(0, description="largest upload accepted (pages check before sending)")
    max_media_seconds: float = Field(0.0, description="longest audio or video query")
    generation: int = Field(0, description="index loads this server process has swapped in (reloads count)")
    worker_pid: int = Field(0, description="the process that answered (one of several with --workers)")
