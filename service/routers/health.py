"""Liveness, readiness and metrics."""

from __future__ import annotations

import os

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import HolderDep, MetricsDep, SettingsDep
from service.schemas import ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (does no work)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut, responses={503: {"description": "not loaded yet"}})
def readyz(holder: HolderDep, settings: SettingsDep, response: Response) -> ReadyOut:
    """Ready only when the index, encoders and refiners are loaded; reports what was loaded."""
    state = holder.state
    if state is None:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        encoder = holder.public_error or "loading"
        return ReadyOut(
            ready=False,
            items=0,
            dim=0,
            encoder=encoder,
            index_type="",
            refiners={},
            video=False,
            worker_pid=os.getpid(),
        )
    manifest = state.store.manifest
    refiners = {
        m: {
            "bytes": r.num_bytes,
            "prediction": r.config.prediction_type,
            "blend": r.config.blend,  # the weight a search gets when it names none
            "mix": r.config.mix,  # or, when trained with its mapper (and adapter), the weights of its scores
            "library_weight": r.config.library_weight,  # of the library side (the candidates mapped back)
            # of the time-segment score (video queries; 0 where the index keeps no spans like the weight's)
            "segment_weight": state.searcher.segment_weight(m),
            # how a video query's spans reach audio space: refined as the query is, or by the span mapper
            "span_map": r.config.span_map if state.searcher.segment_weight(m) else None,
            # and the weight of the spans' library side within the segment score (the windows' spans mapped back)
            "span_library_weight": r.config.span_library_weight if state.searcher.segment_weight(m) else 0.0,
            # the denoising error's weight in a requested rerank (0: it changes nothing; null: an older refiner's 0.5)
            "rerank_weight": r.config.rerank_weight,
            # the text adapter's sentence model, when the mix weighs it (it reads each text query's words)
            "adapter": r.adapter.sentence.ref.name if r.reads_text and r.adapter is not None else None,
            "trained_pairs": r.config.training.get("pairs"),
            "query_encoder": state.encoders.get(m).fingerprint.public_name if state.encoders.get(m) else None,
        }
        for m, r in state.searcher.refiners.items()
    }
    return ReadyOut(
        ready=True,
        items=int(state.store.ntotal),
        dim=manifest.dim,
        encoder=state.encoders.audio.fingerprint.public_name,
        index_type=manifest.index_type,
        faiss_type=manifest.current_type,
        search=manifest.tuning,
        refiners=refiners,
        video=state.encoders.video is not None,
        lexical=state.store.has_lexical,
        meaning=state.searcher.meaning.sentence.ref.name if state.searcher.meaning else None,
        max_upload_bytes=settings.max_upload_bytes,
        max_media_seconds=settings.max_media_seconds,
        generation=holder.generation,
        worker_pid=os.getpid(),
    )


@router.get("/metrics", include_in_schema=False)
def metrics(metrics: MetricsDep, holder: HolderDep) -> Response:
    metrics.track(holder)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
