"""Typed dependencies shared by the routers.

They only read the app's state and headers, so they are `async def`: FastAPI runs a plain `def`
dependency in its thread pool, a round trip through another thread (and the GIL) per dependency per
request. Measured against the plain `def` versions (BENCHMARKS.md, "Batching the CLAP text tower"):
+4% requests/s and a lower p99 at 32 clients. The endpoints that compute stay plain `def`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.metrics import Metrics
from service.settings import Settings
from service.state import ServiceState, StateHolder


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_holder(request: Request) -> StateHolder:
    return request.app.state.holder


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_state(holder: Annotated[StateHolder, Depends(get_holder)]) -> ServiceState:
    if holder.state is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the index is not loaded yet")
    return holder.state


async def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if not settings.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"}
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
HolderDep = Annotated[StateHolder, Depends(get_holder)]
StateDep = Annotated[ServiceState, Depends(get_state)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


async def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """Admin endpoints change what the service serves: with no API key configured they are closed,
    unless the operator opened them on purpose (DIFFGAP_ALLOW_OPEN_ADMIN=1, e.g. behind a private bind)."""
    if not settings.api_key and not settings.allow_open_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin endpoints are closed: set DIFFGAP_API_KEY and send it as a bearer token, or set "
            "DIFFGAP_ALLOW_OPEN_ADMIN=1 (or reload with SIGHUP)",
        )
    await require_api_key(request, settings)
