"""Who is asking: open on loopback, a token or named users anywhere else; CSRF tokens on forms.

Sessions are Starlette's signed cookies naming a row of `web_sessions`: logging out deletes
the row, so a copied cookie stops working then. Authenticated pages are reached by logging in
at /login (a form) or, for scripts, with `Authorization: Bearer <RA_TOKEN>` or HTTP basic auth.
Every label and job records the author this module names, and the author comes from the
credential: a named user's own name, or TOKEN_AUTHOR for the shared token, whatever name was
typed with it (else anyone holding the token could record labels as someone else).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from datetime import timedelta
from functools import lru_cache
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.core import db
from backend.core.models import WebSession, utcnow
from backend.core.settings import Settings

LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}
LOCAL_AUTHOR = "local"  # the author on an open loopback server
TOKEN_AUTHOR = "token"  # the author who logged in with the shared token
OPEN_PATHS = ("/login", "/static/")
MAX_AUTHOR_CHARS = WebSession.__table__.c.author.type.length  # 100, as every author column
SESSION_MAX_AGE_S = 14 * 24 * 3600  # the signed cookie's life (Starlette's default); rows older are deleted


class AccessConfigError(ValueError):
    """The server would be reachable by others without any credential, or a credential setting
    is malformed."""


@lru_cache(maxsize=16)
def _parse_users(users: str) -> dict[str, str]:
    parsed = {}
    for entry in filter(None, (e.strip() for e in users.split(","))):
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise AccessConfigError(f"RA_USERS: {entry!r} is not name:password")
        if len(name) > MAX_AUTHOR_CHARS:
            raise AccessConfigError(f"RA_USERS: user name {name[:20]!r}... is {len(name)} characters; "
                                    f"at most {MAX_AUTHOR_CHARS} (labels and jobs record it)")
        if name in (LOCAL_AUTHOR, TOKEN_AUTHOR):
            raise AccessConfigError(f"RA_USERS: {name!r} is reserved (the author of the open loopback server "
                                    "and of the shared token): choose another name")
        parsed[name] = password
    return parsed


def named_users(settings: Settings) -> dict[str, str]:
    """RA_USERS "alice:pw,bob:pw" -> {"alice": "pw", "bob": "pw"}."""
    return dict(_parse_users(settings.users))


def auth_required(settings: Settings) -> bool:
    return settings.host not in LOOPBACK_HOSTS or bool(settings.token or settings.users)


def check_credentials(settings: Settings) -> None:
    """A malformed RA_USERS or a blank RA_TOKEN fails here, at start."""
    _parse_users(settings.users)
    if settings.token and not settings.token.strip():
        raise AccessConfigError("RA_TOKEN is blank (only whitespace): set a real token, or unset it")


def check_serving_is_safe(settings: Settings) -> None:
    """Refuse to serve beyond loopback without a credential."""
    check_credentials(settings)
    if settings.host not in LOOPBACK_HOSTS and not (settings.token or settings.users):
        raise AccessConfigError(
            f"refusing to serve on {settings.host} without access control: set RA_TOKEN or RA_USERS "
            "(name:password,...), or bind 127.0.0.1")


def _same(given: str, expected: str) -> bool:
    # compare_digest raises TypeError on a str with non-ASCII characters: compare UTF-8 bytes
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


def authenticate(settings: Settings, user: str, password: str) -> str | None:
    """The author for these credentials, or None: a named user's own name, or TOKEN_AUTHOR for
    the shared token (a user name typed with the token is ignored)."""
    expected = _parse_users(settings.users).get(user)
    if expected is not None and _same(password, expected):
        return user
    if settings.token and _same(password, settings.token):
        return TOKEN_AUTHOR
    return None


def _header_author(settings: Settings, request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return authenticate(settings, "", value.strip())
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeError):
            return None  # not base64 of UTF-8: no credential, so a 401 (or the cookie's login)
        return authenticate(settings, user, password)
    return None


# --- web sessions: one row per login, deleted at logout ---

_SESSION_AUTHOR = sa.select(WebSession.author).where(WebSession.id == sa.bindparam("sid"))


def start_web_session(settings: Settings, author: str) -> str:
    """A new session row for `author`; its id goes into the signed cookie."""
    sid, now = secrets.token_urlsafe(32), utcnow()
    with db.get_engine(settings).begin() as conn:
        # sessions whose cookies have expired: nothing can present them any more
        conn.execute(sa.delete(WebSession).where(WebSession.created_at < now - timedelta(seconds=SESSION_MAX_AGE_S)))
        conn.execute(sa.insert(WebSession).values(id=sid, author=author, created_at=now))
    return sid


def web_session_author(settings: Settings, sid: str) -> str | None:
    """The author of session `sid`, or None when it was ended (a primary-key read)."""
    with db.get_engine(settings).connect() as conn:
        return conn.execute(_SESSION_AUTHOR, {"sid": sid}).scalar()


def end_web_session(settings: Settings, sid: str | None) -> None:
    if isinstance(sid, str):
        with db.get_engine(settings).begin() as conn:
            conn.execute(sa.delete(WebSession).where(WebSession.id == sid))


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
    if not isinstance(expected, str) or not submitted or not _same(submitted, expected):
        raise HTTPException(403, "missing or stale CSRF token: reload the page and submit again")


class AccessMiddleware:
    """Sets request.state.author, or turns the request away when a login is needed. Plain ASGI
    (not @app.middleware): that wrapper costs about 1 ms a request."""

    def __init__(self, app: ASGIApp, settings: Settings):
        check_credentials(settings)
        self.app, self.settings = app, settings
        # a SQLite primary-key read takes microseconds; a network database's would hold the event loop
        self.read_in_thread = not settings.sql_url.startswith("sqlite")

    async def _session_author(self, session: dict) -> str | None:
        sid = session.get("sid")
        if not isinstance(sid, str):
            return None
        if self.read_in_thread:
            author = await run_in_threadpool(web_session_author, self.settings, sid)
        else:
            author = web_session_author(self.settings, sid)
        if author is None:
            session.pop("sid", None)  # logged out (here or elsewhere): the cookie is rewritten without it
        return author

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
            author = await self._session_author(request.session)
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
