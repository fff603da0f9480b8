"""Item metadata and audio playback (the indexed window as WAV, or the original file), with ranges."""

from __future__ import annotations

import io
import re
import wave
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from diffgap.index.store import Item
from diffgap.media.audio import AudioDecodeError, decode_audio
from diffgap.media.waveform import WindowOutsideFile
from diffgap.retrieval.sources import SourceError
from service.deps import StateDep, require_api_key
from service.schemas import ItemOut
from service.state import ServiceState

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[Depends(require_api_key)])

PLAYBACK_RATE = 44100
RANGE_RE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})$")  # 18 digits: beyond any file size, within int64
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="item id from a search result")]


def get_item(state: ServiceState, item_id: int) -> Item:
    items = state.store.items([item_id])
    if item_id not in items:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no item with id {item_id}")
    return items[item_id]


def source_path(state: ServiceState, item: Item) -> Path:
    """The item's file: inside the corpus and still the file that was indexed (diffgap.retrieval.sources)."""
    try:
        return state.sources.path_of(item)
    except SourceError as exc:
        code = {"outside": status.HTTP_403_FORBIDDEN, "missing": status.HTTP_404_NOT_FOUND}.get(
            exc.kind, status.HTTP_409_CONFLICT
        )
        raise HTTPException(code, str(exc)) from exc


@router.get("/{item_id}", response_model=ItemOut)
def item(item_id: ItemId, state: StateDep) -> ItemOut:
    return ItemOut.from_item(get_item(state, item_id))


@router.get("/{item_id}/audio", responses={200: {"content": {"audio/wav": {}}}, 206: {"description": "a byte range"}})
def item_audio(
    item_id: ItemId,
    state: StateDep,
    request: Request,
    full: bool = Query(False, description="the whole original file instead of the window"),
) -> Response:
    it = get_item(state, item_id)
    path = source_path(state, it)
    range_header = request.headers.get("range")
    if full:
        # checked by the same rules as the window's ranges; a valid one is served by Starlette
        byte_range(range_header, path.stat().st_size)
        return FileResponse(path, filename=path.name)
    try:
        audio = decode_audio(path, PLAYBACK_RATE, max_seconds=it.end + 0.01, allow_silent=True)
    except AudioDecodeError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"cannot decode the item's audio: {exc}") from exc
    window = audio.wave[int(it.start * PLAYBACK_RATE) : int(it.end * PLAYBACK_RATE)]
    return ranged(wav_bytes(window, PLAYBACK_RATE), range_header, "audio/wav")


@router.get(
    "/{item_id}/waveform.png",
    responses={200: {"content": {"image/png": {}}}, 422: {"description": "the window lies outside the file"}},
)
def item_waveform(
    item_id: ItemId,
    state: StateDep,
    width: Annotated[int, Query(ge=64, le=2000)] = 480,
    height: Annotated[int, Query(ge=16, le=400)] = 64,
) -> Response:
    """The item's whole file as a waveform thumbnail, its window highlighted; drawn once, then cached."""
    it = get_item(state, item_id)
    path = source_path(state, it)
    try:
        png, cached = state.waveforms.get(path, it.content_hash, it.start, it.end, width, height)
    except WindowOutsideFile as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    except AudioDecodeError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"cannot draw the item's audio: {exc}") from exc
    headers = {"Cache-Control": "private, max-age=86400", "X-Cache": "hit" if cached else "miss"}
    return Response(png, media_type="image/png", headers=headers)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def byte_range(range_header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) inclusive of one `bytes=` range, None without a header; a 416 for anything else
    (several ranges, numbers of more than 18 digits, a range outside the file), on both audio routes."""
    if not range_header:
        return None
    m = RANGE_RE.match(range_header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise HTTPException(
            status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
            "malformed Range header (one range, bytes=START-END, is accepted)",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:  # suffix range: the last N bytes
        start, end = max(0, size - int(m.group(2))), size - 1
    if start >= size or start > end:
        raise HTTPException(
            status.HTTP_416_REQUESTED_RANGE_NOT_SATISFIABLE,
            "range outside the file",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def ranged(data: bytes, range_header: str | None, media_type: str) -> Response:
    headers = {"Accept-Ranges": "bytes"}
    size = len(data)
    span = byte_range(range_header, size)
    if span is None:
        return Response(data, media_type=media_type, headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return Response(data[start : end + 1], status_code=206, media_type=media_type, headers=headers)
