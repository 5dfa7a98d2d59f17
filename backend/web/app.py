"""The FastAPI app: HTML pages and their JSON twins under /api. Reads stores and SQL only;
never imports torch (models live in workers/)."""
from __future__ import annotations

import secrets
from urllib.parse import urlsplit

import swagger_ui_bundle

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.sessions import SessionMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backend.web.access import SESSION_MAX_AGE_S, AccessMiddleware
from backend.web.guard import RequestGuard, SecurityHeaders, around_everything
from backend.web.keepalive import RecycleConnections
from backend.web.routes import (auth, corpus, explanations, exports, features, irm, jobs, labels, layers, pairs, runs,
                                texts)
from backend.web.routes import probes  # noqa: F401  (no routes: the feature page's probe section)
from backend.web.routes.common import FRONTEND_DIR, render
from backend.web.routes.edge import invalid, typed_form, validation_detail
from backend.web.routes.submitting import kind_routes
from backend.core.job_kinds import Invalid
from backend.core.settings import Settings, get_settings
from backend.core.store import NotFound, StoreOutdated


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/api"


def _error_page(request: Request, status: int, title: str, messages: list[str]):
    """The error, and what the user typed in a form that posts it again (fix it and resend), with a
    link back to the page the form was on."""
    return render(request, "error.html", {"status": status, "title": title, "messages": messages,
                                          "typed": typed_form(request), "back": _same_site_referer(request)},
                  status_code=status)


def _same_site_referer(request: Request) -> str | None:
    """The page the request came from, as a path, when it is one of this site's."""
    referer = urlsplit(request.headers.get("referer", ""))
    if referer.netloc and referer.netloc != request.url.netloc or not referer.path.startswith("/"):
        return None
    return referer.path + (f"?{referer.query}" if referer.query else "")


async def _not_found(request: Request, exc: NotFound):
    if _is_api(request):
        return JSONResponse({"detail": str(exc)}, status_code=404)
    return _error_page(request, 404, "Not found", [str(exc)])


async def _outdated(request: Request, exc: StoreOutdated):
    if _is_api(request):
        return JSONResponse({"detail": str(exc)}, status_code=409)
    return _error_page(request, 409, "Feature store needs rebuilding", [str(exc)])


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: Starlette's 405 names only the first
    matching route's, and a path here has one route per method."""
    allowed = [method for method in HTTP_METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                      for route in request.app.router.routes)]
    return ", ".join(allowed)


async def _http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": _allowed_methods(request)}
    if _is_api(request):
        return await http_exception_handler(request, exc)
    detail = exc.detail if isinstance(exc.detail, list) else [exc.detail]  # a 422 raised as one lists its errors
    return _error_page(request, exc.status_code, "Error", [e["msg"] if isinstance(e, dict) else str(e) for e in detail])


async def _refused(request: Request, exc: Invalid):
    """A job kind's checks refusing a request: 422 naming the field, or the status the check gave."""
    if exc.status == 422:
        return await _invalid(request, invalid(str(exc), exc.field))
    return await _http_error(request, StarletteHTTPException(exc.status, str(exc)))


async def _invalid(request: Request, exc: RequestValidationError):
    detail = validation_detail(exc)  # FastAPI's own handler echoes inputs it cannot encode (NaN, \ud800)
    if _is_api(request):
        return JSONResponse({"detail": detail}, status_code=422)
    messages = [f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}".removeprefix(": ") for e in detail]
    return _error_page(request, 422, "Invalid request", messages)


def _api_docs() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/api/openapi.json", title="rewardatlas API",
                               swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url="/static/swagger-ui/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.svg")


def _favicon() -> RedirectResponse:
    """Browsers ask for /favicon.ico whatever the page links: send them to the page's icon."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The web app for `settings` (the environment's by default). The database must already
    be at the latest schema (backend.core.db.upgrade); the CLI does that before serving."""
    app = FastAPI(title="rewardatlas", docs_url=None, openapi_url="/api/openapi.json", redoc_url=None)
    app.state.settings = settings or get_settings()
    # Swagger UI's own files from the swagger-ui-bundle package: /api/docs works offline (no CDN)
    app.mount("/static/swagger-ui", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=FRONTEND_DIR / "static"), name="static")
    app.add_api_route("/api/docs", _api_docs, include_in_schema=False)
    app.add_api_route("/favicon.ico", _favicon, include_in_schema=False)
    for module in (auth, runs, layers, features, labels, jobs, texts, corpus, irm, pairs, exports,
                   explanations):
        app.include_router(module.router)
    app.include_router(kind_routes())  # each job kind's JSON and form routes (backend/core/job_kinds/)
    # access runs inside the session middleware (added last, so outermost): it reads the session
    app.add_middleware(AccessMiddleware, settings=app.state.settings)
    app.add_middleware(SessionMiddleware, secret_key=app.state.settings.secret_key or secrets.token_hex(32),
                       session_cookie="rewardatlas_session", same_site="lax", max_age=SESSION_MAX_AGE_S,
                       https_only=app.state.settings.cookie_secure)
    # host, origin and body size, before any session or database work
    app.add_middleware(RequestGuard, settings=app.state.settings)
    app.add_middleware(RecycleConnections)  # outermost of these: it counts every request, even a refused one
    around_everything(app, SecurityHeaders)  # every response, a 500 included
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(StoreOutdated, _outdated)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Invalid, _refused)
    return app
