"""How uvicorn runs the app: an HTTP/1.1 protocol that gives a client a deadline for its request's
headers, so connections that trickle bytes (slowloris) are closed instead of held open forever.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a request's
headers may take: every byte resets its timer. The body's deadline is enforced in the app
(`service.app.BodyLimit`). A reverse proxy in front (nginx's client_header_timeout and
client_body_timeout) does both as well; README's deployment section says so.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete in time."""

    header_timeout_s = 10.0  # set from Settings before the server starts

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request's headers arrived: the body has its own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # waiting for the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
