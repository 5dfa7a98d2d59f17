"""The runs list (/) and one run's page: per layer, what its features predict (held-out R²),
what the model uses (its default ranking's deletion effect, calibration), and SAE metrics."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import selectinload

from backend import charts, db, store
from backend.models import Run
from backend.routes.common import SettingsDep, default_ranking, get_run, render, store_path
from backend.routes.edge import ERROR_RESPONSES, StrictJSONRoute
from backend.routes.layers import RANKING_NAMES
from backend.settings import Settings

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
    } for run in runs]}


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
            "created_at": run.created_at, "config_yaml": run.config_yaml,
        },
        "best_layer": store.best_layer(path),
        "layers": layers,
    }


@router.get("/api/runs", tags=["runs"])
def api_runs(settings: SettingsDep) -> dict[str, Any]:
    """Every registered run, newest first, with its best layer's held-out R²."""
    return runs_data(settings)


@router.get("/api/runs/{run_id}", tags=["runs"])
def api_run(run_id: str, settings: SettingsDep) -> dict[str, Any]:
    """One run: its configuration and every layer's SAE and regression metrics."""
    return run_data(settings, run_id)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def runs_page(request: Request, settings: SettingsDep):
    return render(request, "runs.html", runs_data(settings))


@router.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, run_id: str, settings: SettingsDep):
    data = run_data(settings, run_id)
    return render(request, "run.html", {**data, "chart": charts.r2_bars(data["layers"], data["best_layer"]),
                                        "ranking_names": RANKING_NAMES,
                                        "measured": any(l["faithfulness_relative"] is not None for l in data["layers"])})
