"""One layer's feature table, sorted by regression weight (or another key), paginated."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from backend import store
from backend.routes.common import SettingsDep, get_run, render, run_summary, store_path
from backend.settings import Settings

router = APIRouter()

Sort = Literal["weight", "-weight", "abs_weight", "frequency", "max_activation"]
SORT_LABELS = {
    "weight": "most positive",
    "-weight": "most negative",
    "abs_weight": "largest |weight|",
    "frequency": "most frequent",
    "max_activation": "strongest activation",
}
assert set(SORT_LABELS) == set(store.SORTS)

PageQ = Query(1, ge=1, description="1-based page number")


def layer_data(settings: Settings, run_id: str, layer: int, sort: str, page: int) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    try:
        info = store.layer_info(path, layer)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    size = settings.page_size
    result = store.features(path, layer, sort=sort, limit=size, offset=(page - 1) * size)
    n_pages = max(1, -(-result.total // size))
    if page > n_pages:
        raise store.NotFound(f"page {page} not found: layer {layer} has {n_pages} page(s)")
    return {
        "run": run_summary(run),
        "layer": info,
        "sort": sort,
        "page": page,
        "page_size": size,
        "n_pages": n_pages,
        "total": result.total,
        "max_abs_weight": store.max_abs_weight(path, layer),
        "features": result.rows,
    }


@router.get("/api/runs/{run_id}/layers/{layer}")
def api_layer(run_id: str, layer: int, settings: SettingsDep, sort: Sort = "weight", page: int = PageQ):
    return layer_data(settings, run_id, layer, sort, page)


@router.get("/runs/{run_id}/layers/{layer}", response_class=HTMLResponse)
def layer_page(request: Request, run_id: str, layer: int, settings: SettingsDep,
               sort: Sort = "weight", page: int = PageQ):
    data = layer_data(settings, run_id, layer, sort, page)
    return render(request, "layer.html", {**data, "sort_labels": SORT_LABELS})
