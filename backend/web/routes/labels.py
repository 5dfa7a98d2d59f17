"""Labelling a feature (HTML form and JSON API), its history, and a run's labels as CSV/JSON."""
from __future__ import annotations

import csv
import io
import re
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from backend.core import explanations, labels, store
from backend.web.access import check_csrf, current_author
from backend.core.models import LABELS
from backend.web.routes.common import SettingsDep, TableViewQ, get_run, render, store_path
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, FeatureId, LayerId, StrictJSONRoute, invalid, media_type
from backend.web.routes.features import render_feature_page
from backend.core.store import NotFound

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)
FEATURE = "/runs/{run_id}/layers/{layer}/features/{feature}"


class LabelEdit(BaseModel):
    label: Literal[(*LABELS, "")] | None = Field(  # type: ignore[valid-type]
        ..., description="the new label; empty or null clears it")
    note: str = Field("", max_length=labels.MAX_NOTE)
    version: int = Field(..., ge=0, le=MAX_ID, description="the label's version this edit was made from (0: never labelled)")


def _json_or_csrf(request: Request) -> None:
    """Only JSON bodies, or scripts signed in by header, skip the CSRF token: a browser cannot
    send application/json cross-site without a CORS preflight, and this app enables no CORS."""
    if not (request.state.header_auth or media_type(request) == "application/json"):
        check_csrf(request, request.headers.get("x-csrf-token"))


@router.get("/api" + FEATURE + "/label", tags=["labels"])
def api_label(run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep) -> dict[str, Any]:
    """A feature's label (null when it has none), the version an edit must name, and its history."""
    try:
        labels.check_feature(settings, run_id, layer, feature)
        orphaned = False
    except NotFound:  # a label kept after its feature went (a replace narrowed the layer): shown, and clearable
        if not labels.is_orphaned(settings, run_id, layer, feature):
            raise
        orphaned = True
    return {**labels.current(settings, run_id, layer, feature), "orphaned": orphaned,
            "history": labels.history(settings, run_id, layer, feature)}


@router.put("/api" + FEATURE + "/label", tags=["labels"], dependencies=[Depends(_json_or_csrf)],
            responses={409: {"description": "the label changed since `version`; `current` is the label now"}})
def api_set_label(request: Request, run_id: str, layer: LayerId, feature: FeatureId, edit: LabelEdit,
                  settings: SettingsDep) -> dict[str, Any]:
    """Set or clear a feature's label, if it is still at `version` (409 otherwise: nothing is saved)."""
    try:
        return labels.set_label(settings, run_id, layer, feature, edit.label, edit.note, current_author(request),
                                edit.version)
    except labels.StaleLabel as exc:
        return JSONResponse({"detail": str(exc), "current": jsonable_encoder(exc.current)}, status_code=409)
    except labels.InvalidLabel as exc:
        raise invalid(str(exc), "label") from None


@router.post(FEATURE + "/label", include_in_schema=False)
def label_form(request: Request, run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep, view: TableViewQ,
               label: str = Form(""), note: str = Form(""), version: int = Form(..., ge=0, le=MAX_ID),
               csrf_token: str = Form(""), back: Literal["", "labels"] = Form("")):
    check_csrf(request, csrf_token)
    if back == "labels":  # cleared from the labels page (an orphaned label has no feature page to go back to)
        try:
            labels.set_label(settings, run_id, layer, feature, None, "", current_author(request), version)
        except labels.StaleLabel as exc:
            raise HTTPException(409, str(exc)) from None
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}/labels", status_code=303)
    try:
        labels.set_label(settings, run_id, layer, feature, label, note, current_author(request), version)
    except (labels.StaleLabel, labels.InvalidLabel) as exc:
        # show the page again with what the user typed, so a refused edit loses nothing
        return render_feature_page(request, settings, run_id, layer, feature, view,
                                   label_form={"label": label or None, "note": note, "error": str(exc)},
                                   status_code=409 if isinstance(exc, labels.StaleLabel) else 422)
    query = view.query(page=None)
    url = f"/runs/{quote(run_id, safe='')}/layers/{layer}/features/{feature}"
    return RedirectResponse(url + (f"?{query}" if query else "") + "#label", status_code=303)


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as typed: text starting =, +, -, @, tab or CR would be run
    as a formula (=cmd|...), so it gets a leading apostrophe (OWASP's CSV-injection advice)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _disposition(run_id: str, ext: str, kind: str = "attachment") -> dict[str, str]:
    return {"Content-Disposition": f'{kind}; filename="labels-{re.sub(r"[^A-Za-z0-9._-]", "_", run_id)}.{ext}"'}


@router.get("/api/runs/{run_id}/labels.csv", tags=["labels"], response_class=Response,
            responses={200: {"content": {"text/csv": {}}}})
def export_csv(run_id: str, settings: SettingsDep):
    """Every label of the run, one row per labelled feature, with a header row."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=labels.EXPORT_COLUMNS)
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in _export_rows(settings, run_id))
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=_disposition(run_id, "csv"))


def _export_rows(settings, run_id: str) -> list[dict[str, Any]]:
    """The run's labels, each with its feature's current explanation (backend/core/explanations.py)."""
    return explanations.with_explanations(settings, run_id, labels.export_rows(settings, run_id))


@router.get("/api/runs/{run_id}/labels.json", tags=["labels"])
def export_json(run_id: str, settings: SettingsDep):
    """Every label of the run: the same rows as the CSV."""
    return JSONResponse(_export_rows(settings, run_id), headers=_disposition(run_id, "json", "inline"))


@router.get("/runs/{run_id}/labels", response_class=HTMLResponse, include_in_schema=False)
def labels_page(request: Request, run_id: str, settings: SettingsDep):
    """Every label of the run; those whose feature the run no longer has (orphaned) marked, with
    what was recorded of them, and a button that clears each."""
    path = store_path(settings, get_run(settings, run_id))
    widths = {info["layer"]: info["d_sae"] for info in store.layers(path)}
    rows = labels.orphaned_rows(settings, run_id, widths)
    return render(request, "labels.html", {"run_id": run_id, "rows": rows, "widths": widths,
                                           "n_orphaned": sum(r["orphaned"] for r in rows)})
