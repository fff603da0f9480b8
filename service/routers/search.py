"""Search endpoints: text or vector, uploaded video or audio, and batches of texts."""

from __future__ import annotations

import tempfile
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile, status

from diffgap.audio import AudioDecodeError, decode_audio
from diffgap.refiner import RefinerError
from diffgap.search import Hit, ItemFilter, Query, RefineSpec
from diffgap.video import VideoDecodeError, decode_video
from service.deps import HolderDep, MetricsDep, SettingsDep, StateDep, require_api_key
from service.schemas import BatchSearchRequest, BatchSearchResponse, Filters, HitOut, SearchRequest, SearchResponse
from service.settings import Settings

router = APIRouter(prefix="/v1/search", tags=["search"], dependencies=[Depends(require_api_key)])

VIDEO_TYPES = {"video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "application/octet-stream"}
AUDIO_PREFIX = "audio/"


def hits_out(hits: list[Hit]) -> list[HitOut]:
    return [
        HitOut(
            id=h.item.id,
            path=h.item.path,
            start=h.item.start,
            end=h.item.end,
            duration=h.item.duration,
            sample_rate=h.item.sample_rate,
            tags=h.item.tags,
            description=h.item.description,
            audio_url=f"/v1/items/{h.item.id}/audio",
            score=h.score,
            rank=r + 1,
        )
        for r, h in enumerate(hits)
    ]


def to_filter(filters: Filters | None) -> ItemFilter | None:
    if filters is None:
        return None
    return ItemFilter(
        filters.path_prefix,
        filters.min_duration,
        filters.max_duration,
        tuple(sorted((filters.tags or {}).items())),
        filters.description,
    )


def refine_spec(
    refine: bool, steps: int, mode: str, blend: float | None = None, start_noise: float | None = None
) -> RefineSpec | None:
    return RefineSpec(steps=steps, mode=mode, blend=blend, start_noise=start_noise) if refine else None


def check_k(k: int, settings: Settings) -> None:
    if k > settings.max_k:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"k must be at most {settings.max_k}")


def run_queries(holder: HolderDep, metrics: MetricsDep, queries: list[Query]) -> list[tuple[list[Hit], dict]]:
    try:
        results = (
            [holder.batcher.submit(q) for q in queries] if len(queries) == 1 else holder.state.searcher.run(queries)
        )  # a batch request is already a batch
    except (ValueError, RefinerError) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    for _, timings in results:
        metrics.observe_stages(timings)
    return results


@router.post("", response_model=SearchResponse)
def search(
    body: SearchRequest, state: StateDep, holder: HolderDep, settings: SettingsDep, metrics: MetricsDep
) -> SearchResponse:
    """Search with a text query or a query vector (text encoder space unless the index says otherwise)."""
    check_k(body.k, settings)
    spec = refine_spec(body.refine, body.steps, body.mode, body.blend, body.start_noise)
    if body.text is not None:
        if len(body.text) > settings.max_text_chars:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY, f"text is longer than {settings.max_text_chars} characters"
            )
        query = Query("text", body.k, text=body.text, refine=spec, filter=to_filter(body.filters))
    else:
        dim = state.searcher.query_dim("text")
        if len(body.embedding) != dim:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_ENTITY,
                f"embedding has {len(body.embedding)} values; this index expects {dim}",
            )
        vector = np.asarray(body.embedding, dtype=np.float32)
        if not np.linalg.norm(vector) > 0:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "embedding must not be all zeros")
        query = Query("text", body.k, vector=vector, refine=spec, filter=to_filter(body.filters))
    if spec is not None and "text" not in state.searcher.refiners:
        spec = None
        query.refine = None
    ((hits, timings),) = run_queries(holder, metrics, [query])
    return SearchResponse(results=hits_out(hits), refined=spec is not None, timings_ms=timings)


@router.post("/batch", response_model=BatchSearchResponse)
def search_batch(
    body: BatchSearchRequest, state: StateDep, holder: HolderDep, settings: SettingsDep, metrics: MetricsDep
) -> BatchSearchResponse:
    """Many text queries in one call, run through the models as one batch."""
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
    spec = refine_spec(
        body.refine and "text" in state.searcher.refiners, body.steps, body.mode, body.blend, body.start_noise
    )
    queries = [Query("text", body.k, text=t, refine=spec, filter=to_filter(body.filters)) for t in body.texts]
    results = run_queries(holder, metrics, queries)
    return BatchSearchResponse(
        results=[hits_out(h) for h, _ in results], refined=spec is not None, timings_ms=results[0][1]
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


@router.post("/video", response_model=SearchResponse)
def search_video(
    state: StateDep,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="a video clip (mp4, webm, mov)")],
    k: Annotated[int, Form(ge=1, le=10_000)] = 10,
    refine: Annotated[bool, Form()] = True,
    steps: Annotated[int, Form(ge=1, le=200)] = 5,
) -> SearchResponse:
    """Search the audio index with an uploaded video clip (video encoder, then the video refiner)."""
    check_k(k, settings)
    if (file.content_type or "").split(";")[0] not in VIDEO_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"expected a video upload (mp4, webm, mov), got {file.content_type!r}",
        )
    video_encoder = state.encoders.video
    if video_encoder is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "this index has no video encoder")
    t0 = time.perf_counter()
    with _spool(file, settings) as spool:
        try:
            frames = decode_video(
                spool,
                video_encoder.fps,
                size=getattr(video_encoder, "size", None),
                max_seconds=settings.max_media_seconds + 1,
            )
        except VideoDecodeError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"cannot read the video: {exc}") from exc
    if len(frames) / video_encoder.fps > settings.max_media_seconds:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"video is longer than {settings.max_media_seconds} s"
        )
    vector = video_encoder.encode([frames])[0]
    decode_ms = (time.perf_counter() - t0) * 1e3
    spec = refine_spec(refine, steps, "sample")
    if spec is None and vector.shape[0] != state.store.manifest.dim:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "video search needs the refiner on this index")
    ((hits, timings),) = run_queries(holder, metrics, [Query("video", k, vector=vector, refine=spec)])
    return SearchResponse(
        results=hits_out(hits), refined=spec is not None, timings_ms={"decode_encode": decode_ms, **timings}
    )


@router.post("/audio", response_model=SearchResponse)
def search_audio(
    state: StateDep,
    holder: HolderDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="an audio clip to find similar sounds to")],
    k: Annotated[int, Form(ge=1, le=10_000)] = 10,
) -> SearchResponse:
    """Query by example: the closest indexed windows to an uploaded sound."""
    check_k(k, settings)
    ctype = (file.content_type or "").split(";")[0]
    if not (ctype.startswith(AUDIO_PREFIX) or ctype in VIDEO_TYPES):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"expected an audio upload, got {ctype!r}")
    encoder = state.encoders.audio
    t0 = time.perf_counter()
    with _spool(file, settings) as spool:
        try:
            audio = decode_audio(spool, encoder.sample_rate, max_seconds=settings.max_media_seconds + 1)
        except AudioDecodeError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"cannot read the audio: {exc}") from exc
    if audio.duration > settings.max_media_seconds:
        raise HTTPException(
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"audio is longer than {settings.max_media_seconds} s"
        )
    vector = encoder.encode([audio.wave[: int(encoder.max_seconds * encoder.sample_rate)]])[0]
    decode_ms = (time.perf_counter() - t0) * 1e3
    ((hits, timings),) = run_queries(holder, metrics, [Query("audio", k, vector=vector)])
    return SearchResponse(results=hits_out(hits), refined=False, timings_ms={"decode_encode": decode_ms, **timings})
