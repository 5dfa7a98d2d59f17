"""Log in and out (only needed when the server is not open on loopback; see backend/access.py)."""
from __future__ import annotations

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from backend.access import authenticate, check_csrf
from backend.routes.common import SettingsDep, render

router = APIRouter(include_in_schema=False)


def _safe_next(target: str) -> str:
    """Only paths on this site: never an open redirect."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/"):
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, settings: SettingsDep, user: str = Form(""), password: str = Form(""),
          next: str = Form("/"), csrf_token: str = Form("")):
    check_csrf(request, csrf_token)
    author = authenticate(settings, user.strip(), password)
    if author is None:
        return render(request, "login.html", {"next": _safe_next(next), "error": "wrong user name or password"},
                      status_code=401)
    request.session["author"] = author
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")):
    check_csrf(request, csrf_token)
    request.session.pop("author", None)
    return RedirectResponse("/login", status_code=303)
