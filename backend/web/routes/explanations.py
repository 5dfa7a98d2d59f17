"""Feature explanations on the web: queue an `explanations` job (explain, classify, score) from the
layer page or its JSON twin, search a run's explanations (MiniLM semantic or text match), a
feature's explanation and its versions (and an edit by hand), the layer's agreement tables, and the
run's explanations exported as CSV / JSON.

A job that needs the LLM endpoint is refused at submission (422, naming the setting) when a probe
request finds it unreachable, serving another model, or not returning JSON within the token limit;
no job is made then."""
from __future__ import annotations

import csv
import io
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field

from backend.core import embedding, explanations, jobs, labels, store
from backend.core.job_kinds.explanations import resumed
from backend.web.access import current_author
from backend.web.explanation_agreement import layer_agreement
from backend.web.routes.common import SettingsDep, get_run, render, store_path
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, FeatureId, JobId, LayerId, StrictJSONRoute, invalid
from backend.web.routes.submitting import read_form, submit_params
from backend.web.routes.labels import _cell, _disposition, _json_or_csrf
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_QUERY = 200


@router.post("/jobs/{job_id}/resume", include_in_schema=False)
async def resume_form(request: Request, job_id: JobId, settings: SettingsDep):
    """The same request again (finished features are skipped): what a failed or cancelled job's page offers."""
    await read_form(request)
    try:
        old = jobs.get(settings, job_id)
    except jobs.JobNotFound as exc:
        raise store.NotFound(str(exc)) from None
    job = submit_params(settings, "explanations", resumed(settings, old), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


# --- search -------------------------------------------------------------------------------

def search_data(settings: Settings, run_id: str, q: str, mode: str, layer: int | None) -> dict[str, Any]:
    run = get_run(settings, run_id)
    if layer is not None:
        store.layer_info(store_path(settings, run), layer)
    q = " ".join(q.split())
    results = explanations.search(settings, run_id, q, mode, layer, limit=50) if q else \
        explanations.search(settings, run_id, "", "text", layer, limit=200)
    return {"run_id": run_id, "q": q, "mode": mode, "layer": layer, "results": jsonable_encoder(results)}


SearchQ = Query("", max_length=MAX_QUERY, description="what to look for; empty: every explanation")
ModeQ = Query("semantic", description="semantic: MiniLM cosine similarity; text: explanations containing it")


@router.get("/api/runs/{run_id}/explanations", tags=["explanations"])
def api_search(run_id: str, settings: SettingsDep, q: str = SearchQ,
               mode: Literal["semantic", "text"] = ModeQ, layer: LayerId | None = None) -> dict[str, Any]:
    """Search the run's current explanations: by meaning (MiniLM embeddings, offline) or by text."""
    return search_data(settings, run_id, q, mode, layer)


@router.get("/runs/{run_id}/explanations", response_class=HTMLResponse, include_in_schema=False)
def search_page(request: Request, run_id: str, settings: SettingsDep, q: str = SearchQ,
                mode: Literal["semantic", "text"] = ModeQ, layer: LayerId | None = None):
    return render(request, "explanations.html", search_data(settings, run_id, q, mode, layer))


# --- one feature ---------------------------------------------------------------------------

FEATURE = "/api/runs/{run_id}/layers/{layer}/features/{feature}/explanation"


class ExplanationEdit(BaseModel):
    text: str = Field(min_length=1, max_length=explanations.MAX_TEXT)
    version: int = Field(ge=0, le=MAX_ID, description="the current version this edit was made from (0: none yet)")


@router.get(FEATURE, tags=["explanations"])
def api_feature_explanation(run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep) -> dict:
    """A feature's current explanation (null when none), its classification and scores, and every version."""
    labels.check_feature(settings, run_id, layer, feature)
    return {"current": explanations.current(settings, run_id, layer, feature),
            "history": explanations.history(settings, run_id, layer, feature)}


@router.put(FEATURE, tags=["explanations"], dependencies=[Depends(_json_or_csrf)],
            responses={409: {"description": "the explanation changed since `version`"}})
def api_edit_explanation(request: Request, run_id: str, layer: LayerId, feature: FeatureId, edit: ExplanationEdit,
                         settings: SettingsDep) -> dict:
    """Write a new version of the explanation by hand (it has no classification or scores until a job makes them)."""
    labels.check_feature(settings, run_id, layer, feature)
    text = " ".join(edit.text.split())
    if not text:
        raise invalid("type an explanation", "text")
    try:
        explanations.write(settings, run_id, layer, feature, text, explainer="human", model="human",
                           prompt_version="-", tokens=0, embedding=embedding.embed([text])[0],
                           author=current_author(request), expected_version=edit.version)
    except explanations.StaleExplanation as exc:
        raise HTTPException(409, str(exc)) from None
    return {"current": explanations.current(settings, run_id, layer, feature)}


# --- the layer's agreement tables, and the export ---------------------------------------------

@router.get("/api/runs/{run_id}/layers/{layer}/explanation-agreement", tags=["explanations"])
def api_agreement(run_id: str, layer: LayerId, settings: SettingsDep) -> dict[str, Any]:
    """The reward-related classifier against the human labels (Cohen's κ), and both against the measured
    effect (moves the reward: the measured Δ's 95% CI excludes 0)."""
    return layer_agreement(settings, run_id, layer)


@router.get("/api/runs/{run_id}/explanations.csv", tags=["explanations"], response_class=Response,
            responses={200: {"content": {"text/csv": {}}}})
def export_csv(run_id: str, settings: SettingsDep):
    """Every current explanation of the run with its model, classification and scores."""
    get_run(settings, run_id)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=explanations.EXPORT_COLUMNS)
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in explanations.export_rows(settings, run_id))
    headers = {"Content-Disposition": _disposition(run_id, "csv")["Content-Disposition"].replace("labels-", "explanations-")}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/api/runs/{run_id}/explanations.json", tags=["explanations"])
def export_json(run_id: str, settings: SettingsDep):
    get_run(settings, run_id)
    headers = {"Content-Disposition": _disposition(run_id, "json", "inline")["Content-Disposition"]
               .replace("labels-", "explanations-")}
    return JSONResponse(jsonable_encoder(explanations.export_rows(settings, run_id)), headers=headers)


def job_context(settings: Settings, job: dict) -> dict[str, Any]:
    """An explanations job's features as the database holds them now (what a stopped job kept), and
    the mean of each score beside its baselines over those scored."""
    p = job["params"]
    try:
        explained = explanations.for_features(settings, p["run_id"], int(p["layer"]), list(p["features"]))
    except (KeyError, TypeError, ValueError):
        return {"feature_explanations": {}, "means": None}
    scored = [e["scores"] for e in explained.values() if e.get("scores")]
    if not scored:
        return {"feature_explanations": explained, "means": None}

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    means = {}
    for name in ("detection", "fuzzing", "embedding"):
        means[name] = [mean([s[name][k] for s in scored]) for k in ("score", "shuffled", "random_direction")]
    means["causal"] = [mean([s["causal"]["score"] for s in scored]),
                       mean([(s["causal"]["shuffled"] or {}).get("score") for s in scored]),
                       mean([(s["causal"]["random_direction"] or {}).get("score") for s in scored])]
    # (not "explained": base.html names the run's explained model output so)
    return {"feature_explanations": explained, "means": {"n": len(scored), "scores": means}}
