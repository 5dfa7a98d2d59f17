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
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.core import explanations, labels, store
from backend.web.access import current_author
from backend.web.explanation_agreement import agreement
from backend.core.llm import Endpoint, LLMError, probe
from backend.core.rankings import FALLBACK_RANKING, RANKINGS
from backend.web.routes.common import SettingsDep, get_run, render, store_path
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, FeatureId, JobId, LayerId, StrictJSONRoute, invalid
from backend.web.routes.jobs import _created, _feature_ids, _form, _json_only, _parse, _submit
from backend.web.routes.labels import _cell, _disposition, _json_or_csrf
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_FEATURES = 500
MAX_QUERY = 200
MIN_REPLY_TOKENS = 64  # the longest reply a job asks for: 20-50 snippet numbers, or a 200-character explanation
STAGE_NAMES = {"explain": "explain", "classify": "classify reward-related", "score": "score"}


class ExplanationsRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    selection: Literal["top_ranked", "labelled", "features"] = Field(
        "top_ranked", description="top_ranked: the top `top_n` of the layer's default ranking; labelled: every "
        "labelled feature of the layer; features: the ids in `features`")
    top_n: int = Field(20, ge=1, le=MAX_FEATURES)
    features: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(default_factory=list, max_length=MAX_FEATURES)
    stages: list[Literal["explain", "classify", "score"]] = Field(
        ["explain", "classify", "score"], min_length=1, description="what to do, in this order, per feature")
    reward: str = Field("", max_length=300, description="what the reward rewards, in words, for the prompts "
                        "(e.g. 'positive sentiment of a film review')")
    n_texts: int = Field(400, ge=20, le=5000, description="held-out texts the scores draw their snippets from")
    n_snippets: int = Field(10, ge=10, le=50, description="activating and silent snippets per score (each)")
    overwrite: bool = Field(False, description="redo features already done with the same model and prompt version")

    @field_validator("reward")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.split())


def _selected(settings: Settings, run_id: str, layer: int, req: ExplanationsRequest) -> tuple[list[int], str]:
    path = store_path(settings, get_run(settings, run_id))
    info = store.layer_info(path, layer)  # 404 for an unknown layer
    if req.selection == "top_ranked":
        ranking = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING]
        ids = [r["feature"] for r in store.features(path, layer, sort=ranking.sort, limit=req.top_n).rows]
        described = f"the top {req.top_n} features of the layer's default ranking ({ranking.label})"
    elif req.selection == "labelled":
        ids = sorted(f for f in labels.labels_for_layer(settings, run_id, layer) if f < info["d_sae"])
        described = "every labelled feature of the layer"
    else:
        ids = list(dict.fromkeys(req.features))
        described = "features " + ", ".join(map(str, ids[:20])) + ("…" if len(ids) > 20 else "")
    if not ids:
        raise invalid("no features selected: tick some in the table, or choose a rule that selects at least one",
                      "features")
    outside = [f for f in ids if f >= info["d_sae"]]
    if outside:
        raise invalid(f"feature {outside[0]} is out of range: layer {layer} has features 0–{info['d_sae'] - 1}",
                      "features")
    return ids, described


def endpoint_checked(settings: Settings) -> Endpoint | None:
    """The configured endpoint after a probe request; None: the offline explainer. 422 when the
    probe fails, with the message naming the setting."""
    endpoint = Endpoint.from_settings(settings)
    if endpoint is None:
        return None
    if not endpoint.model:
        raise invalid("RA_LLM_BASE_URL is set but RA_LLM_MODEL is empty: name the model the endpoint serves", "llm")
    if endpoint.max_tokens < MIN_REPLY_TOKENS:
        raise invalid(f"RA_LLM_MAX_TOKENS is {endpoint.max_tokens}: an explanation or a list of snippet numbers needs "
                      f"at least {MIN_REPLY_TOKENS} tokens a reply", "llm")
    try:
        probe(endpoint)
    except LLMError as exc:
        raise invalid(f"the LLM endpoint failed its probe request, so no job was queued: {exc}", "llm") from None
    return endpoint


def submit_explanations(settings: Settings, run_id: str, layer: int, req: ExplanationsRequest, author: str) -> dict:
    features, described = _selected(settings, run_id, layer, req)
    endpoint = endpoint_checked(settings)
    stages = [s for s in STAGE_NAMES if s in req.stages]
    params = {"run_id": run_id, "layer": layer, "features": features, "stages": stages,
              "llm": endpoint.describe() if endpoint else None, "reward": req.reward, "n_texts": req.n_texts,
              "n_snippets": req.n_snippets, "overwrite": req.overwrite,
              "run_version": get_run(settings, run_id).version,
              "described": f"{' + '.join(STAGE_NAMES[s] for s in stages)}: {described}"}
    return _submit(settings, "explanations", params, author, run_id)


@router.post("/runs/{run_id}/layers/{layer}/explain", include_in_schema=False)
async def explain_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    data: dict[str, Any] = {
        "selection": form.get("selection") or "top_ranked", "top_n": form.get("top_n") or 20,
        "features": _feature_ids(form["_all"].getlist("features"), "features", MAX_FEATURES),
        "stages": form["_all"].getlist("stages"), "reward": form.get("reward") or "",
        "n_texts": form.get("n_texts") or 400, "overwrite": form.get("overwrite") == "on"}
    job = submit_explanations(settings, run_id, layer, _parse(ExplanationsRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/jobs/{job_id}/resume", include_in_schema=False)
async def resume_form(request: Request, job_id: JobId, settings: SettingsDep):
    """The same request again (finished features are skipped): what a failed or cancelled job's page offers."""
    from backend.core import jobs

    await _form(request)
    try:
        old = jobs.get(settings, job_id)
    except jobs.JobNotFound as exc:
        raise store.NotFound(str(exc)) from None
    if old["kind"] != "explanations":
        raise invalid(f"job {job_id} is a {old['kind']} job: only explanations jobs resume", "job")
    endpoint = endpoint_checked(settings)  # the endpoint configured now, probed (it may be back, or another)
    params = {**old["params"], "overwrite": False, "resumes": job_id,
              "llm": endpoint.describe() if endpoint else None}
    job = _submit(settings, "explanations", params, current_author(request), old["run_id"])
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/api/runs/{run_id}/layers/{layer}/explanations", status_code=201, tags=["explanations"])
def api_explain(request: Request, response: Response, run_id: str, layer: LayerId, body: ExplanationsRequest,
                settings: SettingsDep) -> dict:
    """Queue an explanations job: explain, classify and score the chosen features through the configured
    LLM endpoint (RA_LLM_BASE_URL, probed first), or offline without one; poll GET /api/jobs/{id}."""
    _json_only(request)
    return _created(response, submit_explanations(settings, run_id, layer, body, current_author(request)))


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
    from backend.core import embedding

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

def agreement_data(settings: Settings, run_id: str, layer: int) -> dict[str, Any]:
    path = store_path(settings, get_run(settings, run_id))
    info = store.layer_info(path, layer)
    explained = explanations.for_layer(settings, run_id, layer)
    labelled = labels.labels_for_layer(settings, run_id, layer)
    ids = sorted((explained.keys() | labelled.keys()) & set(range(info["d_sae"])))
    rows = {}
    if ids:
        where = store.FeatureFilter(features=tuple(ids))
        rows = {r["feature"]: r for r in store.features(path, layer, sort="frequency", where=where, limit=len(ids)).rows}
    return agreement(explained, labelled, rows)


@router.get("/api/runs/{run_id}/layers/{layer}/explanation-agreement", tags=["explanations"])
def api_agreement(run_id: str, layer: LayerId, settings: SettingsDep) -> dict[str, Any]:
    """The reward-related classifier against the human labels (Cohen's κ), and both against the measured
    effect (moves the reward: the measured Δ's 95% CI excludes 0)."""
    return agreement_data(settings, run_id, layer)


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
