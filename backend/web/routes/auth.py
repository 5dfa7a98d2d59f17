"""Log in and out (only needed when the server is not open on loopback; see backend/web/access.py)."""
from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from backend.web.access import TOKEN_AUTHOR, authenticate, check_csrf, end_web_session, start_web_session
from backend.web.routes.common import SettingsDep, render

router = APIRouter(include_in_schema=False)


def _safe_next(target: str) -> str:
    """Only paths on this site: never an open redirect."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _page(request: Request, settings, next: str, error: str | None, status_code: int = 200):
    return render(request, "login.html", {"next": _safe_next(next), "error": error, "named_users": bool(settings.users),
                                          "shared_token": bool(settings.token), "token_author": TOKEN_AUTHOR},
                  status_code=status_code)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep, next: str = "/"):
    return _page(request, settings, next, None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, settings: SettingsDep, user: str = Form(""), password: str = Form(""),
          next: str = Form("/"), csrf_token: str = Form("")):
    check_csrf(request, csrf_token)
    author = authenticate(settings, user.strip(), password)
    if author is None:
        return _page(request, settings, next, "wrong user name or password", status_code=401)
    end_web_session(settings, request.session.get("sid"))  # a login over another ends that one
    request.session["sid"] = start_web_session(settings, author)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, settings: SettingsDep, csrf_token: str = Form("")):
    check_csrf(request, csrf_token)
    end_web_session(settings, request.session.get("sid"))  # the cookie, wherever copied, now names nothing
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
