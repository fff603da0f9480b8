"""Request and response models of the HTTP API."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RefineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refine: bool = Field(True, description="refine the query toward audio space with the DiffGAP refiner")
    steps: int = Field(5, ge=1, le=200, description="DDIM sampling steps")
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


class Filters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path_prefix: str | None = Field(None, max_length=1000, description="only items whose path starts with this")
    min_duration: float | None = Field(None, ge=0)
    max_duration: float | None = Field(None, ge=0)
    tags: dict[str, str] | None = Field(None, description="tag key -> substring the tag value must contain")
    description: str | None = Field(None, max_length=500, description="words the item description must contain")


class SearchRequest(RefineOptions):
    text: str | None = Field(None, description="a text query (exactly one of text or embedding)")
    embedding: list[float] | None = Field(None, description="a query vector in the query encoder's space")
    k: int = Field(10, ge=1, le=10_000)
    filters: Filters | None = None

    @field_validator("embedding")
    @classmethod
    def finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("embedding must contain only finite numbers")
        return v

    @model_validator(mode="after")
    def exactly_one(self) -> SearchRequest:
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'text' or 'embedding'")
        if self.text is not None and not self.text.strip():
            raise ValueError("text must not be empty")
        return self


class BatchSearchRequest(RefineOptions):
    texts: list[str] = Field(..., min_length=1)
    k: int = Field(10, ge=1, le=10_000)
    filters: Filters | None = None


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


class HitOut(ItemOut):
    score: float
    rank: int


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
    index_type: str
    refiners: dict[str, dict[str, Any]]
    video: bool
