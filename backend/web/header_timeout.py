"""A connection must finish sending a request's headers within RA_HEADER_TIMEOUT_S.

uvicorn times out an idle keep-alive connection (`timeout_keep_alive`), but that timer stops
at the first byte of a request: a client that then sends one header line every few seconds
("slowloris") holds its connection, and the file descriptor and memory behind it, for ever
(100 such connections were all still open after 65 s). This protocol arms a timer when a
connection opens and after each response, and closes the connection with a 408 if the next
request's headers are not complete when it fires.

`rewardatlas serve` runs uvicorn with it (`http=HeaderTimeoutProtocol`). It is a plain class
of this module, so that `serve --workers N` can hand it to its worker processes.
"""
from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from backend.core.settings import get_settings

TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"connection: close\r\ncontent-length: 36\r\n\r\nrequest headers not received in time")


class HeaderTimeoutProtocol(HttpToolsProtocol):
    timeout_s: float | None = None  # None: RA_HEADER_TIMEOUT_S (a subclass may fix it, as the tests do)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.timeout_s is None:
            self.timeout_s = get_settings().header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_RESPONSE)
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:  # the next request's headers, in time
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)
