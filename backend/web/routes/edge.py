"""What every request is checked for before a route sees it: ids in range, JSON bodies with
finite numbers, valid Unicode and no NUL, and the error bodies the API documents for each refusal.

A 422 always has FastAPI's documented shape, `{"detail": [{"loc", "msg", "type", ...}]}`,
whether pydantic or a route found the problem; every other refusal is `{"detail": "<message>"}`.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable

from fastapi import Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator

from backend.web.body_parsing import BodyRefused, parse_body
from backend.core.job_kinds.base import MAX_ID
from backend.core.run_config import plain_message

_DIGITS = re.compile(r"[0-9]{1,10}")


def _digits(value: Any) -> Any:
    """An id in a path is written in ASCII digits: pydantic would also read "7.0" as 7."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("an id is a whole number written with the digits 0-9")
    return value


# (Path first: after a validator its bounds would reach the schema as "ge"/"le", not minimum/maximum)
LayerId = Annotated[int, Path(ge=0, le=MAX_ID, description="layer (block) index"), BeforeValidator(_digits)]
FeatureId = Annotated[int, Path(ge=0, le=MAX_ID, description="feature id within the layer's SAE"),
                      BeforeValidator(_digits)]
JobId = Annotated[int, Path(ge=1, le=MAX_ID, description="job id"), BeforeValidator(_digits)]
TextId = Annotated[int, Path(ge=0, le=MAX_ID, description="text id in the run's corpus"), BeforeValidator(_digits)]


def invalid(message: str, *loc: str | int) -> RequestValidationError:
    """A 422 in the documented shape, for problems a route finds itself; `loc` names the field."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": message, "input": None}])


class Message(BaseModel):
    detail: str


def _message(description: str) -> dict[str, Any]:
    return {"model": Message, "description": description}


# What an API route can answer besides its success, documented on every route (OpenAPI).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _message("a request the server cannot read (e.g. a body that is not JSON, or a host it does not serve)"),
    401: _message("authentication required: log in at /login, or send Authorization: Bearer <token>"),
    403: _message("a cross-site request, a form without its CSRF token, or a job another user queued"),
    404: _message("no such run, layer, feature or job"),
    409: _message("the state changed (a stale label version, a finished job) or the store needs rebuilding"),
    413: _message("the request body is larger than the server accepts"),
    415: _message("a write whose body is not application/json"),
    429: _message("too many jobs queued or running for this author"),
}


def media_type(request: Request) -> str:
    """The request's content type without its parameters, lower case ("" when it sends none)."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _is_json(request: Request) -> bool:
    content_type = media_type(request)
    return content_type == "application/json" or content_type.endswith("+json")


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
TYPED_KEY = "rewardatlas.typed"  # where a form's typed fields wait in the request's scope


def keep_typed(request: Request, form) -> None:
    """Keep a browser form's typed fields (not its CSRF token, not files) with the request, so an
    error page can give them back in a form that posts again to the same place."""
    fields = [(key, value) for key, value in form.multi_items() if key != "csrf_token" and isinstance(value, str)]
    request.scope[TYPED_KEY] = {"action": request.url.path, "fields": fields}


def typed_form(request: Request) -> dict | None:
    """What keep_typed kept for this request, if anything was typed."""
    typed = request.scope.get(TYPED_KEY)
    return typed if typed and typed["fields"] else None


class StrictJSONRoute(APIRoute):
    """Routes whose JSON bodies are parsed by backend/web/body_parsing.py (a large one off the event
    loop), before FastAPI reads them: a problem becomes a 422 naming it (inside FastAPI's body
    reading, any error but a syntax error is a bare 400)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH") and _is_json(request):
                body = await request.body()
                if body:
                    try:  # a large body is read in another process (backend/web/body_parsing.py)
                        request._json = await parse_body(body)  # what request.json() hands FastAPI
                    except BodyRefused as exc:
                        raise RequestValidationError([{"type": exc.kind, "loc": ("body",), "msg": str(exc),
                                                       "input": None}]) from None
            elif request.method == "POST" and media_type(request) in FORM_TYPES and not request.url.path.startswith("/api"):
                keep_typed(request, await request.form())  # parsed once: the handler reads the same form
            return await handler(request)

        return strict


def printable(value: Any, limit: int = 200) -> Any:
    """`value` made safe to echo in an error body: non-finite numbers and strings that are not
    valid Unicode written out as text, strings over `limit` characters cut short."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value if len(value) <= limit else value[:limit] + "…"
    if isinstance(value, (list, tuple)):
        return [printable(v, limit) for v in value[:20]]
    if isinstance(value, dict):
        return {printable(str(k), limit): printable(v, limit) for k, v in list(value.items())[:20]}
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return printable(str(value), limit)


def validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    """The error list of a 422, every part of it printable."""
    out = []
    for error in exc.errors():
        item = {"type": error.get("type", "value_error"), "loc": [printable(p) for p in error.get("loc", ())],
                "msg": printable(plain_message(str(error.get("msg", ""))), limit=2000), "input": printable(error.get("input"))}
        if error.get("ctx"):
            item["ctx"] = printable(error["ctx"])
        out.append(item)
    return out
