"""Jobs: the queue page, one job's page and the JSON twins; cancelling. Queueing a job of any kind is
generic over backend/core/job_kinds/ (routes/submitting.py); each kind's result section is its own
template, and the few kinds whose page needs more than the job's params and result add it here."""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from backend.core import jobs, store
from backend.core.job_kinds import KINDS
from backend.core.rankings import barely_reaches, reads_one_token
from backend.core.settings import Settings
from backend.web import ablation_examples, charts, job_summaries
from backend.web.access import current_author, named_users
from backend.web.routes.common import SettingsDep, get_run, job_feature_names, render, store_path
from backend.web.routes.edge import ERROR_RESPONSES, JobId, StrictJSONRoute, invalid
from backend.web.routes.submitting import json_only, read_form

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)


def _job_or_404(settings: Settings, job_id: int) -> dict:
    try:
        return jobs.get(settings, job_id)
    except jobs.JobNotFound as exc:
        raise store.NotFound(str(exc)) from None


@router.post("/jobs/{job_id}/cancel", include_in_schema=False)
async def cancel_form(request: Request, job_id: JobId, settings: SettingsDep):
    await read_form(request)
    _cancel(settings, job_id, current_author(request))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _cancel(settings: Settings, job_id: int, author: str) -> dict:
    job = _job_or_404(settings, job_id)
    if named_users(settings) and job["author"] != author:  # with RA_USERS, a job is its author's to stop
        raise HTTPException(403, f"job {job_id} was queued by {job['author']!r}: only its author may cancel it")
    try:
        return jobs.cancel(settings, job_id)
    except jobs.JobRejected as exc:
        raise HTTPException(409, str(exc)) from None


# --- JSON API ------------------------------------------------------------------------------

@router.get("/api/jobs", tags=["jobs"])
def api_jobs(settings: SettingsDep, limit: int = Query(100, ge=1, le=500, description="how many jobs")) -> dict:
    """The most recent jobs, newest first (results left out)."""
    return {"jobs": [{k: v for k, v in j.items() if k != "result"} for j in jobs.recent(settings, limit)]}


@router.get("/api/workers", tags=["jobs"])
def api_workers(settings: SettingsDep) -> dict:
    """The live workers (seen within the last seconds) and what each is doing: a queued job runs
    only when one exists."""
    return {"workers": jobs.live_workers(settings)}


@router.get("/api/jobs/{job_id}", tags=["jobs"])
def api_job(job_id: JobId, settings: SettingsDep) -> dict:
    return _job_or_404(settings, job_id)


@router.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
def api_cancel(request: Request, job_id: JobId, settings: SettingsDep) -> dict:
    json_only(request, body=False)
    return _cancel(settings, job_id, current_author(request))


# --- pages -----------------------------------------------------------------------------------

@router.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request, settings: SettingsDep):
    return render(request, "jobs.html", {"jobs": jobs.recent(settings, 200), "workers": jobs.live_workers(settings)})


ExampleSort = Query("delta", description="delta: largest drop first; -delta: largest rise first; abs: largest "
                                        "change first; text: by text id")


def _ablation_rows(job: dict, sort: str) -> list[dict]:
    job_id = job["id"]
    if job["kind"] != "ablation":
        raise HTTPException(404, f"job {job_id} is a {job['kind']} job, not an ablation: it has no examples")
    if not job.get("result"):
        raise HTTPException(409, f"job {job_id} has no result yet ({job['status']})")
    try:
        return ablation_examples.sorted_rows(ablation_examples.example_rows(job["result"]), sort)
    except ValueError as exc:
        raise invalid(str(exc), "sort") from None


@router.get("/api/jobs/{job_id}/examples", tags=["jobs"], responses=ERROR_RESPONSES)
def api_ablation_examples(job_id: JobId, settings: SettingsDep, sort: str = ExampleSort,
                          format: Literal["json", "csv"] = Query("json", description="json, or csv (a download)")):
    """An ablation's per-example results: text, score before and after, measured Δ, and what the
    regression and attribution predicted; all of them, in `sort` order."""
    rows = _ablation_rows(_job_or_404(settings, job_id), sort)
    if format == "csv":
        return StreamingResponse(ablation_examples.csv_lines(rows), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="ablation-{job_id}.csv"'})
    return {"job_id": job_id, "sort": sort, "n": len(rows), "examples": rows}


def _ablation_page(settings: Settings, job: dict, query: dict) -> dict[str, Any]:
    """The examples' page in the chosen order, the Δ histograms, and how well each prediction agreed."""
    result, context = job.get("result") or {}, {"layer_info": _layer_or_none(settings, job)}
    if not result:
        return context
    examples = _ablation_rows(job, query["sort"])
    context["examples"], context["n_pages"] = ablation_examples.page_of(examples, query["page"])
    context.update(example_sort=query["sort"], example_sorts={k: v[0] for k, v in ablation_examples.SORTS.items()},
                   example_page=query["page"], n_examples=len(examples))
    deltas = [e["delta"] for e in examples]
    control_deltas = [d for c in result.get("controls", []) for d in c["deltas"]]
    context["chart"] = charts.delta_histograms(deltas, control_deltas or None)
    context["agreement"] = _agreement([e["predicted"] for e in examples], deltas)  # order-free
    if all(e.get("attributed") is not None for e in examples):
        context["attribution_agreement"] = _agreement([e["attributed"] for e in examples], deltas)
    return context


def _inference_page(settings: Settings, job: dict, query: dict) -> dict[str, Any]:
    result = job.get("result")
    return {"layer_info": _layer_or_none(settings, job), "tokens": _shaded(result) if result else None}


def _explanations_page(settings: Settings, job: dict, query: dict) -> dict[str, Any]:
    """Each feature's explanation as the database holds it now."""
    from backend.web.routes.explanations import job_context  # lazy: routes/explanations imports this module's peers

    return job_context(settings, job)


# what a kind's result section needs beyond the job itself (most kinds: nothing)
PAGE_CONTEXT: dict[str, Callable[[Settings, dict, dict], dict[str, Any]]] = {
    "ablation": _ablation_page, "inference": _inference_page, "explanations": _explanations_page}


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request, job_id: JobId, settings: SettingsDep, sort: str = ExampleSort,
             page: int = Query(1, ge=1, le=1_000_000)):
    job = _job_or_404(settings, job_id)
    kind = KINDS.get(job["kind"])
    context: dict[str, Any] = {"job": job, "kind": kind, "title": job_summaries.human_name(job["kind"]),
                               "feature_names": job_feature_names(settings, job),  # the top tokens of its features
                               "workers": jobs.live_workers(settings) if job["status"] in ("queued", "running") else []}
    if job["kind"] in PAGE_CONTEXT:
        context.update(PAGE_CONTEXT[job["kind"]](settings, job, {"sort": sort, "page": page}))
    return render(request, "job.html", context)


def _layer_or_none(settings: Settings, job: dict) -> dict | None:
    """The job's layer row, for what the page says about it; None once its run is gone."""
    try:
        info = store.layer_info(store_path(settings, get_run(settings, job["run_id"])), int(job["params"].get("layer")))
    except (store.NotFound, store.StoreOutdated, TypeError, ValueError):
        return None
    return {**info, "barely_reaches": barely_reaches(info), "reads_one_token": reads_one_token(info)}


def _agreement(predicted: list[float], actual: list[float]) -> float | None:
    """Pearson r of the regression's predicted change with the actual change, per example."""
    n = len(actual)
    if n < 3:
        return None
    mp, ma = sum(predicted) / n, sum(actual) / n
    cov = sum((p - mp) * (a - ma) for p, a in zip(predicted, actual))
    vp = sum((p - mp) ** 2 for p in predicted)
    va = sum((a - ma) ** 2 for a in actual)
    return cov / math.sqrt(vp * va) if vp > 0 and va > 0 else None


def _shaded(result: dict) -> list[dict]:
    """Per shown feature, the text's tokens shaded by that feature (as on feature pages)."""
    rows = []
    for f in result["features"]:
        acts = result["acts"][str(f)]
        after = (result.get("edit") or {}).get("acts_after", {}).get(str(f))
        scale = max(max(acts, default=0.0), max(after or [0.0]), 1e-9)
        rows.append({"feature": f, "peak": max(acts, default=0.0), "scale": scale, "acts": acts, "acts_after": after})
    return rows
