"""The runs list (/) and one run's page: per layer, what its features predict (held-out R²),
what the model uses (its default ranking's deletion effect, calibration), and SAE metrics; and
deleting a run, which first writes an export of it (its labels and their history included)."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import selectinload

from backend.web import charts

from backend.core import db, layer_choice, store
from backend.web.access import check_csrf
from backend.core.models import Run
from backend.core.rankings import MEASURE_WORDS, VERDICT_WORDS
from backend.web.routes.common import SettingsDep, default_ranking, get_run, render, store_path
from backend.web.routes.edge import ERROR_RESPONSES, Message, StrictJSONRoute
from backend.web.routes.labels import _json_or_csrf
from backend.web.routes.layers import RANKING_NAMES
from backend.web.sections import SECTIONS, run_sections
from backend.core.settings import Settings
from backend.core.store import NotFound

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)


def runs_data(settings: Settings) -> dict[str, Any]:
    """Every registered run, newest first, summarised from the SQL registry alone."""
    with db.session(settings) as s:
        runs = s.scalars(
            sa.select(Run).options(selectinload(Run.saes)).order_by(Run.created_at.desc(), Run.id)
        ).all()
    return {"runs": [{
        "id": run.id, "name": run.name, "model": run.model, "adapter": run.adapter,
        "dataset": run.dataset, "n_texts": run.n_texts, "n_tokens": run.n_tokens,
        "n_layers": len(run.saes), "best_r2_heldout": run.best_r2_heldout, "best_layer": run.best_layer,
        "created_at": run.created_at,
    } for run in runs], "best_layer_rule": layer_choice.RULE}


def run_data(settings: Settings, run_id: str) -> dict[str, Any]:
    """One run: its registry row plus every layer's metrics (with the sort its table opens in,
    `default_sort`) and the best layer from its feature store."""
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    layers = [{**layer, "default_sort": default_ranking(layer).sort} for layer in store.layers(path)]
    return {
        "run": {
            "id": run.id, "name": run.name, "model": run.model, "adapter": run.adapter,
            "dataset": run.dataset, "n_texts": run.n_texts, "n_tokens": run.n_tokens,
            "created_at": run.created_at, "config_yaml": run.config_yaml, "version": run.version,
            "output": store.explained_output(path),  # the head output explained (model.output); None: one output
        },
        "best_layer": store.best_layer(path),
        "best_layer_rule": layer_choice.RULE_WORDS[layer_choice.choice_rule(layers)],
        "layers": layers,
        **run_sections(settings, run, path),
    }


@router.get("/api/runs", tags=["runs"])
def api_runs(settings: SettingsDep) -> dict[str, Any]:
    """Every registered run, newest first, with its best layer's held-out R²."""
    return runs_data(settings)


@router.get("/api/runs/{run_id}", tags=["runs"])
def api_run(run_id: str, settings: SettingsDep) -> dict[str, Any]:
    """One run: its configuration, every layer's SAE and regression metrics, and its analyses
    across layers (backend/web/sections: `irm_ablation`, ...)."""
    return run_data(settings, run_id)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def runs_page(request: Request, settings: SettingsDep):
    return render(request, "runs.html", runs_data(settings))


@router.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, run_id: str, settings: SettingsDep):
    return _render_run_page(request, settings, run_id)


def _render_run_page(request: Request, settings: Settings, run_id: str, delete_error: str | None = None,
                     status_code: int = 200):
    data = run_data(settings, run_id)
    return render(request, "run.html", {**data, "chart": charts.r2_bars(data["layers"], data["best_layer"]),
                                        "ranking_names": RANKING_NAMES, "delete_error": delete_error,
                                        "best_rule": data["best_layer_rule"], "verdict_words": VERDICT_WORDS,
                                        "measure_words": MEASURE_WORDS,
                                        "section_templates": [section.template for section in SECTIONS],
                                        "measured": any(l["faithfulness_relative"] is not None for l in data["layers"])},
                  status_code=status_code)


def delete_run(settings: Settings, run_id: str) -> str:
    """Delete the run, its export written first; returns the export's path within the data dir."""
    try:
        path = db.delete_run_with_export(settings, run_id)
    except db.ExportFailed as exc:
        # the server's disk, not the request: 507 Insufficient Storage says so, and nothing was deleted
        raise HTTPException(507, str(exc)) from None
    if path is None:
        raise NotFound(f"run {run_id!r} not found")
    return path.relative_to(settings.data_dir).as_posix()


@router.delete("/api/runs/{run_id}", tags=["runs"], dependencies=[Depends(_json_or_csrf)],
               responses={507: {"model": Message, "description": "the export could not be written: nothing was deleted"}})
def api_delete_run(run_id: str, settings: SettingsDep) -> dict[str, Any]:
    """Delete a run for good. First an export of its registry row, config, SAEs, every label and
    every label event is written under the server's data dir (`export`: its path there); then the
    run's SQL rows and its run directory go. Send it with content-type application/json, an
    Authorization header, or the page's X-CSRF-Token."""
    return {"run_id": run_id, "deleted": True, "export": delete_run(settings, run_id)}


@router.post("/runs/{run_id}/delete", response_class=HTMLResponse, include_in_schema=False)
def delete_run_form(request: Request, run_id: str, settings: SettingsDep, confirm: str = Form(""),
                    csrf_token: str = Form("")):
    check_csrf(request, csrf_token)
    typed = confirm.strip()
    if typed != run_id:
        get_run(settings, run_id)  # an unknown run is a 404, not a confirmation to type again
        why = "type the run id to confirm" if not typed else f"{typed!r} is not this run's id"
        return _render_run_page(request, settings, run_id, status_code=422,
                                delete_error=f"Nothing was deleted: {why} ({run_id}).")
    return render(request, "run_deleted.html", {"run_id": run_id, "export": delete_run(settings, run_id)})
