"""`diffgap-serve`: the FastAPI application and its command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from service.metrics import Metrics
from service.routers import admin, health, items, search, ui
from service.server import HeaderDeadlineH11
from service.settings import Settings
from service.state import StateHolder
from service.workers import run_workers, worker_settings

log = logging.getLogger("diffgap.serve")
UPLOAD_PATHS = ("/v1/search/video", "/v1/search/audio")
DOCS_ASSETS = "/docs-assets"


class BodyLimit:
    """Refuse request bodies over the limit as they stream in, before they are parsed or stored: uploads
    (multipart) up to `max_upload_bytes`, every other body (JSON) up to `max_json_bytes`."""

    IDLE_READ_S = 10.0  # longest wait for the next piece of a body

    def __init__(self, app: ASGIApp, max_upload_bytes: int, max_json_bytes: int, body_timeout_s: float = 60.0) -> None:
        self.app, self.max_upload_bytes, self.max_json_bytes = app, max_upload_bytes, max_json_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["path"] in UPLOAD_PATHS
        limit = self.max_upload_bytes if upload else self.max_json_bytes
        allowed = limit + 64 * 1024 if upload else limit  # the multipart envelope may add a little
        what = "upload" if upload else "request body"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > allowed:
            await self._reject(send, what, limit)
            return
        seen = 0
        started = rejected = False
        deadline = time.monotonic() + self.body_timeout_s

        async def counting_receive() -> Message:
            nonlocal seen, rejected
            if rejected:
                return {"type": "http.disconnect"}
            wait = min(self.IDLE_READ_S, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except asyncio.TimeoutError:  # noqa: UP041 - a different class on Python 3.10
                # A client that trickles its body holds a connection and a worker thread: let it go.
                rejected = True
                if not started:
                    await self._send(send, 408, "the request body arrived too slowly")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > allowed and not started:
                    # Answer now and tell the app the client left, so it stops reading and storing the body.
                    rejected = True
                    await self._reject(send, what, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return  # the 413 has been sent; drop whatever the app says after the disconnect
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not rejected:
                raise

    async def _reject(self, send: Send, what: str, limit: int) -> None:
        await self._send(send, 413, f"{what} is larger than {limit} bytes")

    @staticmethod
    async def _send(send: Send, status_code: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status_code)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None, *, load_before_serving: bool = False) -> FastAPI:
    """The service. One process loads its index in the background: /healthz answers at once and
    /readyz says 503 until the index is in. A worker of several (`load_before_serving`) loads before
    uvicorn starts listening on its socket, so no connection reaches a worker that cannot answer yet
    (a worker that replaces a dead one would otherwise answer 503 for as long as it loads)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder = StateHolder(settings)
        app.state.holder = holder
        if load_before_serving:
            await asyncio.to_thread(_load_quietly, holder)
        else:
            loader = threading.Thread(target=_load_quietly, args=(holder,), name="index-loader", daemon=True)
            loader.start()
        _install_sighup(holder)
        yield
        holder.close()

    app = FastAPI(
        title="diffgap",
        version="0.1.0",
        lifespan=lifespan,
        description="Text/video/audio-to-audio retrieval with DiffGAP query refinement.",
        docs_url=None,  # served below from the package's own copy of Swagger UI, not from a CDN
        redoc_url=None,
    )
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="diffgap API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    app.state.settings = settings
    app.state.metrics = Metrics()
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Range"],
        )
    app.add_middleware(
        BodyLimit,
        max_upload_bytes=settings.max_upload_bytes,
        max_json_bytes=settings.max_json_bytes,
        body_timeout_s=settings.body_timeout_s,
    )

    @app.middleware("http")
    async def observe(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's signature
        t0 = time.perf_counter()
        request_id = request_id_of(request)
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: one line per request at error level, the traceback at debug
            log.error("request %s %s %s failed: %s", request_id, request.method, request.url.path, type(exc).__name__)
            log.debug("request %s traceback", request_id, exc_info=exc)
            response = JSONResponse(
                {"detail": "internal error; the server log has this request id", "request_id": request_id},
                status_code=500,
            )
        response.headers["X-Request-ID"] = request_id
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics: Metrics = request.app.state.metrics
        metrics.requests.labels(name, request.method, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
        if metrics.shared:  # one process answers /metrics for all: each writes its gauges as it goes
            metrics.track(request.app.state.holder)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Echoing the input back could fail (NaN is not JSON) and would reflect huge bodies: send messages only.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    for router in (health.router, search.router, items.router, admin.router, ui.router):
        app.include_router(router)
    return app


REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID when it is a sane token (a proxy's), else a new one."""
    given = request.headers.get("x-request-id", "")
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]


def _load_quietly(holder: StateHolder) -> None:
    with contextlib.suppress(Exception):  # reported by /readyz; the process stays up for diagnosis
        holder.load()


def _install_sighup(holder: StateHolder) -> None:
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return

    def on_hup(signum: int, frame: object) -> None:
        threading.Thread(target=_load_quietly, args=(holder,), name="index-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)


def worker_app() -> FastAPI:
    """One worker's app: uvicorn calls this factory in each process `--workers N` spawns."""
    settings, log_level = worker_settings()
    configure_logging(log_level)
    HeaderDeadlineH11.header_timeout_s = settings.header_timeout_s
    return create_app(settings, load_before_serving=True)


def configure_logging(level: str) -> None:
    """The service's log format, once per process (a worker of several configures its own)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="diffgap-serve", description="Serve an index over HTTP.")
    parser.add_argument("--index", help="index directory (env DIFFGAP_INDEX_DIR)")
    parser.add_argument("--host", help="bind address (env DIFFGAP_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env DIFFGAP_PORT, default 8000)")
    parser.add_argument("--threads", type=int, help="torch/FAISS intra-op threads (env DIFFGAP_THREADS, default 1)")
    parser.add_argument(
        "--workers", type=int, help="server processes sharing the port and the index (env DIFFGAP_WORKERS, default 1)"
    )
    parser.add_argument("--video-encoder", help="video encoder spec, e.g. clip (env DIFFGAP_VIDEO_ENCODER)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {
            "index_dir": args.index,
            "host": args.host,
            "port": args.port,
            "threads": args.threads,
            "workers": args.workers,
            "video_encoder": args.video_encoder,
        }.items()
        if v is not None
    }
    configure_logging(args.log_level)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:  # a flag or DIFFGAP_* variable out of bounds: say which, no traceback
        for error in exc.errors():
            log.error("setting %s: %s", ".".join(map(str, error["loc"])), error["msg"])
        return 2
    if not (settings.index_dir / "manifest.json").exists():
        log.error(
            "%s is not an index directory; build one with `diffgap-index build` or `make demo`", settings.index_dir
        )
        return 2
    log.info(
        "serving %s on http://%s:%d (%d worker%s)",
        settings.index_dir,
        settings.host,
        settings.port,
        settings.workers,
        "s" if settings.workers > 1 else "",
    )
    if settings.workers > 1:
        run_workers(settings, args.log_level, timeout_graceful_shutdown=10)
        return 0
    HeaderDeadlineH11.header_timeout_s = settings.header_timeout_s
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        workers=1,
        timeout_graceful_shutdown=10,
        http=HeaderDeadlineH11,
        limit_concurrency=settings.limit_concurrency,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
