"""Typed dependencies shared by the routers."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from service.metrics import Metrics
from service.settings import Settings
from service.state import ServiceState, StateHolder


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_holder(request: Request) -> StateHolder:
    return request.app.state.holder


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_state(holder: Annotated[StateHolder, Depends(get_holder)]) -> ServiceState:
    if holder.state is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the index is not loaded yet")
    return holder.state


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
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


def require_admin(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """Admin endpoints change what the service serves: with no API key configured they are closed,
    unless the operator opened them on purpose (DIFFGAP_ALLOW_OPEN_ADMIN=1, e.g. behind a private bind)."""
    if not settings.api_key and not settings.allow_open_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "admin endpoints are closed: set DIFFGAP_API_KEY and send it as a bearer token, or set "
            "DIFFGAP_ALLOW_OPEN_ADMIN=1 (or reload with SIGHUP)",
        )
    require_api_key(request, settings)
