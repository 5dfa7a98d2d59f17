"""Who is asking: open on loopback, a token or named users anywhere else; CSRF tokens on forms.

Sessions are Starlette's signed cookies. Authenticated pages are reached by logging in at
/login (a form) or, for scripts, with `Authorization: Bearer <RA_TOKEN>` or HTTP basic auth.
Every label and job records the author this module names.
"""
from __future__ import annotations

import base64
import hmac
import secrets
from urllib.parse import quote

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.settings import Settings

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
LOCAL_AUTHOR = "local"  # the author on an open loopback server
TOKEN_AUTHOR = "token"  # the author who logged in with the shared token
OPEN_PATHS = ("/login", "/static/")


class AccessConfigError(ValueError):
    """The server would be reachable by others without any credential."""


def named_users(settings: Settings) -> dict[str, str]:
    """RA_USERS "alice:pw,bob:pw" -> {"alice": "pw", "bob": "pw"}."""
    users = {}
    for entry in filter(None, (e.strip() for e in settings.users.split(","))):
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise AccessConfigError(f"RA_USERS: {entry!r} is not name:password")
        users[name] = password
    return users


def auth_required(settings: Settings) -> bool:
    return settings.host not in LOOPBACK_HOSTS or bool(settings.token or settings.users)


def check_serving_is_safe(settings: Settings) -> None:
    """Refuse to serve beyond loopback without a credential."""
    named_users(settings)  # a malformed RA_USERS fails here, at start
    if settings.host not in LOOPBACK_HOSTS and not (settings.token or settings.users):
        raise AccessConfigError(
            f"refusing to serve on {settings.host} without access control: set RA_TOKEN or RA_USERS "
            "(name:password,...), or bind 127.0.0.1")


def authenticate(settings: Settings, user: str, password: str) -> str | None:
    """The author for these credentials, or None. The token works with any (or no) user name."""
    if settings.token and hmac.compare_digest(password, settings.token):
        return user or TOKEN_AUTHOR
    expected = named_users(settings).get(user)
    if expected is not None and hmac.compare_digest(password, expected):
        return user
    return None


def _header_author(settings: Settings, request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return authenticate(settings, "", value.strip())
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return authenticate(settings, user, password)
    return None


def current_author(request: Request) -> str:
    """The signed-in author (set by the access middleware)."""
    return request.state.author


def csrf_token(request: Request) -> str:
    """This session's CSRF token, made on first use; every form carries it."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return token


def check_csrf(request: Request, submitted: str | None) -> None:
    """A form post must carry the session's token (a cross-site form cannot know it)."""
    if getattr(request.state, "header_auth", False):
        return  # scripts with Authorization headers: no cookie involved, nothing to forge
    expected = request.session.get("csrf")
    if not expected or not submitted or not hmac.compare_digest(expected, submitted):
        raise HTTPException(403, "missing or stale CSRF token: reload the page and submit again")


class AccessMiddleware:
    """Sets request.state.author, or turns the request away when a login is needed. Plain ASGI
    (not @app.middleware): that wrapper costs about 1 ms a request."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["header_auth"] = False
        if not auth_required(self.settings):
            state["author"] = LOCAL_AUTHOR
            return await self.app(scope, receive, send)
        request = Request(scope)
        author = _header_author(self.settings, request)
        if author is not None:
            state["header_auth"] = True
        else:
            author = request.session.get("author")
        if author is None and not request.url.path.startswith(OPEN_PATHS):
            if request.url.path.startswith("/api"):
                response = JSONResponse({"detail": "authentication required: log in at /login, or send "
                                                   "Authorization: Bearer <token>"}, status_code=401)
            else:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                response = RedirectResponse(f"/login?next={quote(target)}", status_code=303)
            return await response(scope, receive, send)
        state["author"] = author or ""
        await self.app(scope, receive, send)
