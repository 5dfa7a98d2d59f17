"""One corpus text's page: its RM score and where that sits in the corpus, its reward, whether
the model saw all of it (a text longer than model.max_length is cut there), and, once a worker
has computed it, its score's attribution per layer; from here, attribute, edit or diff it."""
from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from backend.core.job_kinds import Target
from backend.core.job_kinds.inference import InferenceRequest
from backend.core import jobs, store
from backend.web.access import current_author
from backend.web.routes.common import (SettingsDep, attribution_names, get_run, json_response, render, run_summary,
                                       store_path)
from backend.web.routes.edge import ERROR_RESPONSES, StrictJSONRoute, TextId, invalid
from backend.web.routes.submitting import parse, read_form, submit
from backend.core.settings import Settings
from backend.core.chat_roles import markers_from_info, role_parts

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)
DEFAULT_MAX_LENGTH = 128  # backend/core/run_config.py ModelConfig.max_length's default


@lru_cache(maxsize=64)  # a run's config is the same on every visit to its texts
def _max_length(config_yaml: str) -> int:
    """The run's model.max_length, as its config says (the default where it says nothing)."""
    try:
        config = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        config = None
    model = config.get("model") if isinstance(config, dict) else None
    value = model.get("max_length") if isinstance(model, dict) else None
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_LENGTH


def text_data(settings: Settings, run_id: str, text_id: int) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    try:
        row = store.text(path, text_id)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    max_length = _max_length(run.config_yaml)
    # the pipeline cuts a longer text at max_length (dataset.truncation), so a text that fills
    # it may have been longer: the page says so rather than let a score look like the whole text's
    row["reached_max_length"] = row["n_tokens"] >= max_length
    # a chat run reading the response only: where it begins and ends in the rendered text
    row["roles"] = role_parts(row["text"], markers_from_info(store.run_info(path)))
    return {"run": run_summary(run), "text": row, "max_length": max_length,
            "layers": [x["layer"] for x in store.layers(path)], "best_layer": run.best_layer, **_text_jobs(settings, run_id, text_id)}


def _text_jobs(settings: Settings, run_id: str, text_id: int) -> dict[str, Any]:
    """What the worker has computed for this text: per layer, the newest attribution (and the
    job it came from), how much of the text the model read, the edits run on it, and the jobs
    still to finish."""
    found = jobs.of_run(settings, "inference", run_id, lambda p: p.get("text_id") == text_id)
    attribution: dict[str, dict] = {}
    read, edits, pending = None, [], []
    for job in found:  # newest first
        if job["status"] in ("queued", "running"):
            pending.append({k: job[k] for k in ("id", "status", "progress", "message")})
        if job["status"] != "done" or not job["result"]:
            continue
        result = job["result"]
        read = read or result.get("read")
        for layer, att in (result.get("attribution") or {}).items():
            attribution.setdefault(layer, {**att, "job_id": job["id"]})
        if result.get("edit"):
            e = result["edit"]
            edits.append({"job_id": job["id"], "layer": job["params"]["layer"], "mode": e["mode"], "value": e.get("value"),
                          "features": e["features"], "before": e["reward_before"], "after": e["reward_after"]})
    ordered = dict(sorted(attribution.items(), key=lambda item: int(item[0])))
    return {"attribution": ordered, "read": read, "edits": edits, "pending": pending}


@router.get("/api/runs/{run_id}/texts/{text_id}", tags=["texts"])
async def api_text_page(run_id: str, text_id: TextId, settings: SettingsDep) -> dict[str, Any]:
    """One corpus text: its RM score and percentile in the corpus, its reward, split, token count
    and whether it reached model.max_length (and so may have been cut there); once computed
    (POST a job naming `text_id`), its score's attribution per layer — tokens, per-token
    contributions, the top features with their contributions, the completeness residual — how
    much of it the model read, and the edits run on it."""
    return json_response(text_data(settings, run_id, text_id))


@router.get("/runs/{run_id}/texts/{text_id}", response_class=HTMLResponse, include_in_schema=False)
async def text_page(request: Request, run_id: str, text_id: TextId, settings: SettingsDep):
    data = text_data(settings, run_id, text_id)
    return render(request, "text.html", {**data, "feature_names": attribution_names(settings, run_id, data["attribution"])})


@router.post("/runs/{run_id}/texts/{text_id}/attribute", include_in_schema=False)
async def attribute_form(request: Request, run_id: str, text_id: TextId, settings: SettingsDep):
    """Queue this text's attribution at one layer or all, then come back to its page."""
    form = await read_form(request)
    layers = [x["layer"] for x in store.layers(store_path(settings, get_run(settings, run_id)))]
    chosen = form.get("layer") or "all"
    if not layers:
        raise invalid("this run has no layer with an SAE to attribute the score at", "layer")
    if chosen == "all":
        wanted = layers
    elif chosen.isascii() and chosen.isdigit() and int(chosen) in layers:
        wanted = [int(chosen)]
    else:
        raise invalid(f"layer {chosen[:40]!r} has no SAE in this run (its layers: {', '.join(map(str, layers))})",
                      "layer")
    req = parse(InferenceRequest, {"text_id": text_id, "steps": form.get("steps", 16),
                                    "attribution_layers": wanted})
    submit(settings, "inference", Target(run_id, wanted[0]), req, current_author(request))
    return RedirectResponse(f"/runs/{quote(run_id, safe='')}/texts/{text_id}#attribution", status_code=303)
