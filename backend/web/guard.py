"""Guards in front of the app: the host names it answers to, where a state-changing request may
come from, how large a request body may be, and the headers that tell a browser what a page may do.

Plain ASGI classes, as AccessMiddleware. The host check is what keeps an open loopback server
from a DNS-rebinding page: that page reaches 127.0.0.1 under its own name, so its requests carry
that name as Host. The Origin check refuses a form or fetch sent from another origin: another
site, or another port or scheme of this one (a page served on localhost:9999 is not this server).
"""
from __future__ import annotations

import re
from typing import Callable
from urllib.parse import urlsplit

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.web.access import LOOPBACK_HOSTS
from backend.web.body_parsing import NUL_MESSAGE
from backend.core.settings import Settings

WILDCARD_BINDS = {"0.0.0.0", "::", ""}  # a bind address that is no name a browser would use
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
DEFAULT_PORTS = {"http": 80, "https": 443}
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_ESCAPED_NUL = re.compile(rb"%00")

# No inline script anywhere (page scripts are files under /static). Style attributes stay
# allowed, and only they (style-src-attr): token shading and weight bars carry each value as
# style="--a:37%" / style="width:12%", numbers the server computes, never user text.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# The Swagger page (its files served from this site: backend/web/app.py) is started by an inline
# script and styles inline; it shows only this API's own OpenAPI description.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
DOCS_PATH = "/api/docs"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # the views' query strings stay on this site
]


def allowed_hosts(settings: Settings) -> frozenset[str] | None:
    """The host names requests may name, or None for any (RA_ALLOWED_HOSTS="*")."""
    names = {_bare(h) for h in settings.allowed_hosts.split(",") if h.strip()}
    if "*" in names:
        return None
    bind = _bare(settings.host)
    return frozenset(names | LOOPBACK_HOSTS | ({bind} if bind not in WILDCARD_BINDS else set()))


def _bare(name: str) -> str:
    return name.strip().strip("[]").rstrip(".").lower()


def host_name(host: str) -> str:
    """A Host header's name: "Example.com:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    host = host.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return _bare(host)


def _url_origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin or Referer, the port its scheme's default when unnamed;
    None for "null" or anything that is no http(s) address."""
    try:
        parts = urlsplit(url.strip())
        scheme, host, port = parts.scheme.lower(), _bare(parts.hostname or ""), parts.port
    except ValueError:  # an unclosed "[", a port beyond 65535 or not a number
        return None
    if scheme not in DEFAULT_PORTS or not host:
        return None
    return scheme, host, port if port is not None else DEFAULT_PORTS[scheme]


def request_port(scope: Scope, host_header: str) -> int:
    """The port a request was sent to, as its Host header says (browsers name any port but the
    scheme's default), else the scheme's default."""
    name, port = host_header.strip(), ""
    if name.startswith("["):
        port = name[name.find("]") + 1:].lstrip(":") if "]" in name else ""
    elif name.count(":") == 1:
        port = name.partition(":")[2]
    scheme = scope.get("scheme", "http")
    return int(port) if port.isdigit() and len(port) <= 5 else DEFAULT_PORTS.get(scheme, 80)


def _has_nul(scope: Scope) -> str | None:
    """Where a NUL sits in the request line ("path" or "query"), or None."""
    if "\x00" in scope.get("path", ""):
        return "path"
    query = scope.get("query_string", b"")
    if b"\x00" in query or _ESCAPED_NUL.search(query):
        return "query"
    return None


def nul_refusal(scope: Scope, where: str) -> Response:
    """The 422 for a NUL, in FastAPI's documented shape under /api."""
    message = f"the {where} {NUL_MESSAGE}"
    if _is_api(scope):
        return JSONResponse({"detail": [{"type": "value_error", "loc": [where], "msg": message, "input": None}]},
                            status_code=422)
    return PlainTextResponse(message, status_code=422)


def _is_api(scope: Scope) -> bool:
    path = scope.get("path", "")
    return path == "/api" or path.startswith("/api/")


def refusal(scope: Scope, status: int, message: str) -> Response:
    """JSON under /api (as every API error), plain text elsewhere."""
    if _is_api(scope):
        return JSONResponse({"detail": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body streams past the limit: inside a route it is answered by
    the app's HTTP error handlers (JSON on /api, the error page elsewhere), outside by RequestGuard."""


class RequestGuard:
    """Refuses a request naming a host not allowed (400), a state-changing request whose Origin
    (or, without one, Referer) is another site (403), and a body over RA_MAX_BODY_BYTES (413), by
    its Content-Length or, without one, as it streams in."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.max_body = app, settings.max_body_bytes
        self.hosts = allowed_hosts(settings)
        self.too_large = f"request body over {self.max_body:,} bytes: the limit is RA_MAX_BODY_BYTES"

    def _host_allowed(self, name: str, request_host: str) -> bool:
        return name in self.hosts if self.hosts is not None else name == request_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = host_name(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            shown = repr(host[:100]) if host else "(no Host header)"
            return await refusal(scope, 400, f"host {shown} is not one this server answers to: add it to "
                                             "RA_ALLOWED_HOSTS (comma-separated host names)")(scope, receive, send)
        nul_at = _has_nul(scope)
        if nul_at:
            return await nul_refusal(scope, nul_at)(scope, receive, send)
        if scope["method"] in STATE_CHANGING:
            source = headers.get("origin") or headers.get("referer")
            if source is not None and not self._same_origin(source, scope, host, headers.get("host", "")):
                kind = "Origin" if headers.get("origin") else "Referer"
                message = (f"cross-site request refused: its {kind} {source[:200]!r} is not this server (its "
                           "scheme, a host it answers to (RA_ALLOWED_HOSTS) and its port)")
                return await refusal(scope, 403, message)(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            return await refusal(scope, 413, self.too_large)(scope, receive, send)
        form = headers.get("content-type", "").lower().startswith(FORM_TYPES)
        await self._limited(scope, receive, send, form)

    def _same_origin(self, source: str, scope: Scope, host: str, host_header: str) -> bool:
        """Scheme, host and port: a page on another port of a loopback name is another origin."""
        origin = _url_origin(source)
        if origin is None:
            return False
        scheme, source_host, port = origin
        return (scheme == scope.get("scheme", "http") and port == request_port(scope, host_header)
                and self._host_allowed(source_host, host))

    async def _limited(self, scope: Scope, receive: Receive, send: Send, form: bool) -> None:
        received, started, tail = 0, False, b""

        async def limited_receive() -> Message:
            nonlocal received, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body:
                    raise BodyTooLarge(413, self.too_large)
                if form:  # a NUL in a form field, raw or %00, even split across chunks
                    seen = tail + chunk
                    if b"\x00" in seen or _ESCAPED_NUL.search(seen):
                        raise NulInBody()
                    tail = seen[-2:]
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await refusal(scope, 413, self.too_large)(scope, receive, send)
        except NulInBody:
            if started:
                raise
            await nul_refusal(scope, "body")(scope, receive, send)


class NulInBody(HTTPException):
    """Raised from `receive` when a form body holds a NUL: a 422 in FastAPI's documented shape
    (an HTTPException, so that FastAPI's form parsing passes it on instead of making it a 400)."""

    def __init__(self):
        super().__init__(422, [{"type": "value_error", "loc": ["body"], "msg": f"the body {NUL_MESSAGE}",
                                "input": None}])


class SecurityHeaders:
    """Adds the CSP and the other security headers to every response that has none of its own.
    Installed around the whole stack (outermost), so that an unhandled error's 500, answered by
    Starlette's ServerErrorMiddleware, carries them too."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = (DOCS_CSP if scope.get("path", "").startswith(DOCS_PATH) else CSP).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = [(b"content-security-policy", csp), *SECURITY_HEADERS]
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def around_everything(app, middleware: Callable[[ASGIApp], ASGIApp]) -> None:
    """Wrap `app`'s whole middleware stack, Starlette's ServerErrorMiddleware included (add_middleware
    can only go inside that one)."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: middleware(build())
