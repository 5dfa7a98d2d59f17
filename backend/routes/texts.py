"""One corpus text's page: its RM score and where that sits in the corpus, its reward, and
whether the model saw all of it (a text longer than model.max_length is cut there)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from backend import store
from backend.routes.common import SettingsDep, get_run, json_response, render, run_summary, store_path
from backend.routes.edge import ERROR_RESPONSES, StrictJSONRoute, TextId
from backend.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)
DEFAULT_MAX_LENGTH = 128  # workers/config.py ModelConfig.max_length's default


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
    try:
        row = store.text(store_path(settings, run), text_id)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    max_length = _max_length(run.config_yaml)
    # the pipeline cuts a longer text at max_length (dataset.truncation), so a text that fills
    # it may have been longer: the page says so rather than let a score look like the whole text's
    row["reached_max_length"] = row["n_tokens"] >= max_length
    return {"run": run_summary(run), "text": row, "max_length": max_length}


@router.get("/api/runs/{run_id}/texts/{text_id}", tags=["texts"])
async def api_text_page(run_id: str, text_id: TextId, settings: SettingsDep) -> dict[str, Any]:
    """One corpus text: its RM score and percentile in the corpus, its reward, split, token count
    and whether it reached model.max_length (and so may have been cut there)."""
    return json_response(text_data(settings, run_id, text_id))


@router.get("/runs/{run_id}/texts/{text_id}", response_class=HTMLResponse, include_in_schema=False)
async def text_page(request: Request, run_id: str, text_id: TextId, settings: SettingsDep):
    return render(request, "text.html", text_data(settings, run_id, text_id))
