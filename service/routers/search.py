"""Search endpoints: text or vector, uploaded video or audio, and batches of texts.

Handlers translate HTTP to `diffgap.retrieval` queries and back; every query, of any modality and
from the batch endpoint too, runs through the service's micro-batcher.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile, status

from diffgap.diffusion.refiner import RefinerError
from diffgap.index.vectors import MAX_EFFORT
from diffgap.media.audio import AudioDecodeError
from diffgap.media.video import VideoDecodeError
from diffgap.retrieval.search import (
    ItemFilter,
    MediaTooLongError,
    Query,
    QueryInputError,
    QueryResult,
    RefineSpec,
    decode_query,
)
from service.deps import HolderDep, MetricsDep, SettingsDep, StateDep, require_api_key
from service.schemas import BatchSearchRequest, BatchSearchResponse, Filters, HitOut, SearchRequest, SearchResponse
from service.settings import Settings
from service.state import ServiceState, StateHolder

router = APIRouter(prefix="/v1/search", tags=["search"], dependencies=[Depends(require_api_key)])

VIDEO_TYPES = {"video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "application/octet-stream"}
AUDIO_PREFIX = "audio/"


# the upload endpoints' form field for what RankOptions.search_effort is in JSON bodies
SearchEffortForm = Annotated[int | None, Form(ge=1, le=MAX_EFFORT, description="see /v1/search's search_effort")]


def check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"k must be at most {settings.max_k}")


def run_queries(holder: StateHolder, metrics: MetricsDep, queries: list[Query]) -> list[QueryResult]:
    """Through the micro-batcher; a query the library refuses (bad input, no encoder) is a 422."""
    try:
        results = holder.batcher.submit_many(queries)
    except (ValueError, RefinerError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    for result in results:
        metrics.observe_stages(result.timings_ms)
    return results


def one_result(holder: StateHolder, metrics: MetricsDep, query: Query, **extra_ms: float) -> SearchResponse:
    (result,) = run_queries(holder, metrics, [query])
    return SearchResponse(
        results=HitOut.from_hits(result.hits), refined=result.refined, timings_ms={**extra_ms, **result.timings_ms}
    )


@router.post("", response_model=SearchResponse)
def search(
    body: SearchRequest, state: StateDep, holder: HolderDep, settings: SettingsDep, metrics: MetricsDep
) -> SearchResponse:
    """Search with a text query or a query vector (in the text encoder's space)."""
    check_k(body.k, settings)
    spec = body.refine_spec(settings.default_steps)
    item_filter = Filters.to_item_filter(body.filters)
    ranking = body.ranking()
    if body.text is not None:
        if len(body.text) > settings.max_text_chars:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, f"text is longer than {settings.max_text_chars} characters"
            )
        query = Query("text", body.k, text=body.text, refine=spec, filter=item_filter, **ranking)
        return one_result(holder, metrics, query)
    if body.item_id is not None:  # more like this: the item's own vector, already in audio space
        ids, xb = state.store.vectors(np.asarray([body.item_id], dtype=np.int64))
        if not len(ids):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no item with id {body.item_id}")
        path = state.store.items([body.item_id])[body.item_id].path
        like = dataclasses.replace(item_filter or ItemFilter(), exclude_path=path)
        ranking["lexical"] = False  # no words to match
        return one_result(holder, metrics, Query("audio", body.k, vector=xb[0], filter=like, **ranking))
    try:
        dim = state.searcher.query_dim("text")
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    if len(body.embedding) != dim:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            f"embedding has {len(body.embedding)} values; this index expects {dim}",
        )
    vector = np.asarray(body.embedding, dtype=np.float32)
    if not np.linalg.norm(vector) > 0:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "embedding must not be all zeros")
    return one_result(holder, metrics, Query("text", body.k, vector=vector, refine=spec, filter=item_filter, **ranking))


@router.post("/batch", response_model=BatchSearchResponse)
def search_batch(
    body: BatchSearchRequest, holder: HolderDep, settings: SettingsDep, metrics: MetricsDep
) -> BatchSearchResponse:
    """Many text queries in one call; they share model calls with each other and with concurrent searches."""
    check_k(body.k, settings)
    if len(body.texts) > settings.max_batch_queries:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY, f"at most {settings.max_batch_queries} texts per batch"
        )
    for i, text in enumerate(body.texts):
        if not text.strip() or len(text) > settings.max_text_chars:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, f"texts[{i}] must be 1 to {settings.max_text_chars} characters"
            )
    spec = body.refine_spec(settings.default_steps)
    item_filter = Filters.to_item_filter(body.filters)
    ranking = body.ranking()
    queries = [Query("text", body.k, text=t, refine=spec, filter=item_filter, **ranking) for t in body.texts]
    results = run_queries(holder, metrics, queries)
    return BatchSearchResponse(
        results=[HitOut.from_hits(r.hits) for r in results],
        refined=results[0].refined,
        timings_ms=results[0].timings_ms,
    )


def _spool(upload: UploadFile, settings: Settings) -> tempfile.SpooledTemporaryFile:
    """Copy the upload in chunks, refusing it as soon as it passes the size limit."""
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)  # noqa: SIM115 - the caller closes it
    total = 0
    while chunk := upload.file.read(1024 * 1024):
        total += len(chunk)
        if total > settings.max_upload_bytes:
            spool.close()
            raise HTTPException(
                status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"upload is larger than {settings.max_upload_bytes} bytes"
            )
        spool.write(chunk)
    if total == 0:
        spool.close()
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "the uploaded file is empty")
    spool.seek(0)
    return spool


def media_query(
    upload: UploadFile,
    modality: str,
    state: ServiceState,
    settings: Settings,
    k: int,
    refine: RefineSpec | None,
    effort: int | None = None,
) -> tuple[Query, float]:
    """Decode an upload (in this request's thread, before batching) into a query; ms spent decoding."""
    if state.encoders.get(modality) is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"this index has no {modality} encoder")
    t0 = time.perf_counter()
    with _spool(upload, settings) as spool:
        try:
            media = decode_query(spool, modality, state.encoders, max_seconds=settings.max_media_seconds)
        except (AudioDecodeError, VideoDecodeError) as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"cannot read the {modality}: {exc}") from exc
        except MediaTooLongError as exc:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, str(exc)) from exc
        except QueryInputError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    return Query(modality, k, media=media, refine=refine, effort=effort), (time.perf_counter() - t0) * 1e3


@router.post("/video", response_model=SearchResponse)
def search_video(
    state: StateDep,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="a video clip (mp4, webm, mov)")],
    k: Annotated[int, Form(ge=1, le=10_000)] = 10,
    refine: Annotated[bool, Form()] = True,
    steps: Annotated[int | None, Form(ge=1, le=200)] = None,
    search_effort: SearchEffortForm = None,
) -> SearchResponse:
    """Search the audio index with an uploaded video clip (video encoder, then the video refiner)."""
    check_k(k, settings)
    if (file.content_type or "").split(";")[0] not in VIDEO_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"expected a video upload (mp4, webm, mov), got {file.content_type!r}",
        )
    spec = RefineSpec(steps or settings.default_steps) if refine else None
    query, decode_ms = media_query(file, "video", state, settings, k, spec, search_effort)
    return one_result(holder, metrics, query, decode=decode_ms)


@router.post("/audio", response_model=SearchResponse)
def search_audio(
    state: StateDep,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="an audio clip to find similar sounds to")],
    k: Annotated[int, Form(ge=1, le=10_000)] = 10,
    search_effort: SearchEffortForm = None,
) -> SearchResponse:
    """Query by example: the closest indexed windows to an uploaded sound."""
    check_k(k, settings)
    ctype = (file.content_type or "").split(";")[0]
    if not (ctype.startswith(AUDIO_PREFIX) or ctype in VIDEO_TYPES):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"expected an audio upload, got {ctype!r}")
    query, decode_ms = media_query(file, "audio", state, settings, k, None, search_effort)
    return one_result(holder, metrics, query, decode=decode_ms)
