"""Queueing jobs from the web, generic over the job kinds (backend/core/job_kinds/): for each kind, its
JSON route (the request model as the body: 201, the job, and its Location) and its form's route (the
form's fields parsed into the same model: a redirect to the job's page). A kind's checks run before
any job exists, so a bad request is a 4xx with a message and queues nothing."""
from __future__ import annotations

import inspect
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ValidationError

from backend.core import jobs
from backend.core.job_kinds import KINDS, Form, JobKind, Target
from backend.core.settings import Settings
from backend.web.access import check_csrf, current_author
from backend.web.routes.common import SettingsDep
from backend.web.routes.edge import ERROR_RESPONSES, FeatureId, LayerId, StrictJSONRoute, media_type

PATH_TYPES = {"run_id": str, "layer": LayerId, "feature": FeatureId}


def submit(settings: Settings, kind: str, target: Target, request: BaseModel, author: str) -> dict:
    """The kind's checks, then the job: its params, queued under the run the request names."""
    params = KINDS[kind].prepare(settings, target, request)
    return submit_params(settings, kind, params, author)


def submit_params(settings: Settings, kind: str, params: dict, author: str) -> dict:
    try:
        return jobs.submit(settings, kind, params, author, params.get("run_id"))
    except jobs.JobRejected as exc:
        raise HTTPException(429, str(exc)) from None


async def read_form(request: Request) -> Form:
    """The posted form, its CSRF token checked."""
    form = await request.form()
    check_csrf(request, form.get("csrf_token"))
    return Form({k: v for k, v in form.items() if isinstance(v, str)}, form.getlist)


def parse(model: type[BaseModel], data: dict) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def json_only(request: Request, body: bool = True) -> None:
    """Cookie-authenticated JSON writes must be JSON: a cross-site form cannot send that. A
    write without a body (`body` False) may also come without a content type: a form always
    sends one, and the session cookie (SameSite=Lax) does not go with a cross-site fetch."""
    content_type = media_type(request)
    if request.state.header_auth or content_type == "application/json":
        return
    if not body and not content_type and request.headers.get("content-length", "0") == "0":
        return
    raise HTTPException(415, "send the request body as application/json")


def created(response: Response, job: dict) -> dict:
    response.headers["Location"] = f"/api/jobs/{job['id']}"  # where the job's state and result are
    return job


def _signature(kind: JobKind, path: str, body: bool) -> inspect.Signature:
    """What FastAPI reads off a generated route: the request, the path's ids, the settings and (JSON) the body."""
    P = inspect.Parameter
    params = [P("request", P.POSITIONAL_OR_KEYWORD, annotation=Request)]
    if body:
        params += [P("response", P.POSITIONAL_OR_KEYWORD, annotation=Response),
                   P("body", P.POSITIONAL_OR_KEYWORD, annotation=kind.request)]
    params += [P(name, P.POSITIONAL_OR_KEYWORD, annotation=PATH_TYPES[name]) for name in kind.path_names(path)]
    params.append(P("settings", P.POSITIONAL_OR_KEYWORD, annotation=SettingsDep))
    return inspect.Signature(params)


def _api_route(kind: JobKind):
    def queue(request: Request, response: Response, body: BaseModel, settings: Settings, **ids) -> dict:
        json_only(request)
        return created(response, submit(settings, kind.name, Target(**ids), body, current_author(request)))

    queue.__signature__ = _signature(kind, kind.api_path, body=True)
    queue.__doc__, queue.__name__ = kind.api_doc, f"queue_{kind.name}"
    return queue


def _form_route(kind: JobKind):
    async def queue_from_form(request: Request, settings: Settings, **ids) -> RedirectResponse:
        form = await read_form(request)
        job = submit(settings, kind.name, Target(**ids), parse(kind.request, kind.form_fields(form)),
                     current_author(request))
        return RedirectResponse(f"/jobs/{job['id']}", status_code=303)

    queue_from_form.__signature__ = _signature(kind, kind.form_path, body=False)
    queue_from_form.__name__ = f"{kind.name}_form"
    return queue_from_form


def kind_routes() -> APIRouter:
    """Every kind's JSON route and form route (made per app, so every declared kind has them)."""
    router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)
    for kind in KINDS.values():
        router.add_api_route(kind.api_path, _api_route(kind), methods=["POST"], status_code=201, tags=[kind.api_tag],
                             name=f"queue_{kind.name}")
        if kind.form_path:
            router.add_api_route(kind.form_path, _form_route(kind), methods=["POST"], include_in_schema=False,
                                 name=f"{kind.name}_form")
    return router
