"""Keep-alive connections are closed after a number of requests, so that they spread over the
server's worker processes again (nginx does the same: keepalive_requests).

`serve --workers N` runs N processes accepting on one socket. A browser keeps its connection
open, and a process that accepted several connections keeps them all, however busy it is:
measured with 8 clients on 2 processes, 6 connections landed on one, whose clients then
waited 2.3 times as long as the other two. When a connection closes, its client reconnects,
and the process that is free at that moment is the one that accepts.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS_PER_CONNECTION = 50  # a reconnect on loopback costs ~0.2 ms: 0.004 ms a request
_TRACKED = 4096  # connections counted at once; past that the counts start again (harmless)


class RecycleConnections:
    """Answers the `max_requests`-th request of each connection with `Connection: close`."""

    def __init__(self, app: ASGIApp, max_requests: int = REQUESTS_PER_CONNECTION):
        self.app, self.max_requests = app, max_requests
        self.served: dict[tuple, int] = {}  # (client host, port) of an open connection -> requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] != "http" or not client:
            return await self.app(scope, receive, send)
        key = tuple(client)
        served = self.served.get(key, 0) + 1
        if served < self.max_requests:
            if len(self.served) >= _TRACKED and key not in self.served:
                self.served.clear()  # connections that closed on their own leave their counts behind
            self.served[key] = served
            return await self.app(scope, receive, send)
        self.served.pop(key, None)

        async def send_and_close(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_and_close)
