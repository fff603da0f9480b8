"""Administration: swap in a rebuilt index without dropping requests."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from service.deps import HolderDep, SettingsDep, require_admin
from service.state import redact_paths
from service.workers import ask_siblings_to_reload

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/reload")
def reload(holder: HolderDep, settings: SettingsDep) -> dict[str, object]:
    """Reload the index directory (after `diffgap-index update`); the old one serves until the swap.
    Concurrent reloads share one. With several workers, this one reloads before answering and the
    others follow at once. Needs the API key; with none configured, DIFFGAP_ALLOW_OPEN_ADMIN=1."""
    try:
        holder.load()
    except Exception as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"reload failed, still serving the previous index: {exc.__class__.__name__}: {redact_paths(str(exc))}",
        ) from exc
    if settings.workers > 1:
        ask_siblings_to_reload()
    return {"reloaded": True, "items": int(holder.state.store.ntotal), "generation": holder.generation}
