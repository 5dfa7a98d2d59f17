"""One layer's feature table: sorted, filtered (sign, frequency, token) and paginated, with
every choice in the query string."""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from backend import labels, store
from backend.routes.common import SettingsDep, TableView, TableViewQ, get_run, render, run_summary, store_path
from backend.settings import Settings
from backend.store_schema import FEATURES, sorts

router = APIRouter()

# The sorts offered as tabs, and what each means to a reader (the spec names the columns;
# a tab can say more, e.g. which end of the sort it shows).
SORT_LABELS = {
    "weight": "most positive weight",
    "-weight": "most negative weight",
    "abs_weight": "largest |weight|",
    "abs_std_weight": "largest |std. weight|",
    "correlation": "reward correlation",
    "reward_effect": "reward effect",
    "frequency": "most frequent",
    "max_activation": "strongest activation",
}
assert set(SORT_LABELS) <= set(store.SORTS), set(SORT_LABELS) - set(store.SORTS)
COLUMN_NAMES = {sort.key: sort.label for sort in sorts(FEATURES)}


def describe_sort(sort: str) -> str:
    """'reward correlation, smallest first' for '-correlation'."""
    return f"{COLUMN_NAMES[sort.lstrip('-')]}, {'smallest' if sort.startswith('-') else 'largest'} first"


def layer_data(settings: Settings, run_id: str, layer: int, view: TableView) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    try:
        info = store.layer_info(path, layer)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    size = settings.page_size
    labelled = labels.labels_for_layer(settings, run_id, layer)
    where = labels.restrict(view.filter, view.label, labelled, info["d_sae"])
    result = store.features(path, layer, sort=view.sort, where=where, limit=size, offset=(view.page - 1) * size)
    for row in result.rows:
        mine = labelled.get(row["feature"])
        row["label"], row["label_note"] = (mine["label"], mine["note"]) if mine else (None, None)
    n_pages = max(1, -(-result.total // size))
    if view.page > n_pages:
        raise store.NotFound(f"page {view.page} not found: this view of layer {layer} has {n_pages} page(s)")
    return {
        "run": run_summary(run),
        "layer": info,
        "view": view.model_dump(),
        "page_size": size,
        "n_pages": n_pages,
        "total": result.total,
        "max_abs_weight": store.max_abs_weight(path, layer),
        "features": result.rows,
    }


@router.get("/api/runs/{run_id}/layers/{layer}", tags=["features"])
def api_layer(run_id: str, layer: int, settings: SettingsDep, view: TableViewQ) -> dict[str, Any]:
    """A layer's metrics and one page of its feature table."""
    return layer_data(settings, run_id, layer, view)


@router.get("/runs/{run_id}/layers/{layer}", response_class=HTMLResponse, include_in_schema=False)
def layer_page(request: Request, run_id: str, layer: int, settings: SettingsDep, view: TableViewQ,
               go: int | None = Query(None, ge=0, description="open this feature id")):
    if go is not None:  # "go to feature #": straight to its page, keeping the view for j/k
        store.feature(store_path(settings, get_run(settings, run_id)), layer, go)  # 404 if unknown
        query = view.query(page=None)
        return RedirectResponse(f"/runs/{quote(run_id, safe='')}/layers/{layer}/features/{go}" + (f"?{query}" if query else ""),
                                status_code=303)
    data = layer_data(settings, run_id, layer, view)
    return render(request, "layer.html", {**data, "view_obj": view, "sort_labels": SORT_LABELS,
                                          "label_names": labels.LABEL_NAMES})
