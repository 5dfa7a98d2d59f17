"""One feature's page: what predicts the score (weight), what the model uses (attribution,
effect per unit, the measured change when zeroed beside both predictions of it), activation
histogram, top tokens, top contexts and random examples per activation bin."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from backend.web import charts

from backend.core import explanations, labels, store
from backend.web.routes.layers import describe_sort
from backend.web.routes.common import (SettingsDep, TableView, TableViewQ, default_ranking, get_run, json_response,
                                   render, run_summary, store_path)
from backend.web.routes.edge import ERROR_RESPONSES, FeatureId, LayerId, StrictJSONRoute
from backend.web.routes.exports import saedashboard_url
from backend.web.routes.probes import feature_probes
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

def feature_data(settings: Settings, run_id: str, layer: int, feature: int, view: TableView) -> dict[str, Any]:
    """One feature, and where it stands in the table view the reader came from (`in_view`:
    its index, the view's size, and the previous and next feature ids -- what j/k follow)."""
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    try:
        info = store.feature(path, layer, feature)
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc}") from None
    contexts, quantiles = info.pop("contexts"), info.pop("quantile_contexts")
    default_view = info.pop("default_view")
    layer_row = store.layer_info(path, layer)
    sort = view.sorted_by(layer_row)
    if sort == default_ranking(layer_row).sort and not view.filtered:
        in_view = default_view  # the store holds each feature's place in the default ranking's order
    else:
        where = view.filter_for(layer_row)
        if view.label:  # the same label filter as the table, so j/k walk what the table lists
            where = labels.restrict(where, view.label, labels.labels_for_layer(settings, run_id, layer),
                                    store.layer_info(path, layer)["d_sae"])
        if view.explanation:  # ... and the same explanation filter
            where = explanations.restrict(where, view.explanation, explanations.for_layer(settings, run_id, layer))
        in_view = store.neighbours_in_order(path, layer, feature, sort, where)
    if in_view["index"] is not None:
        in_view["table_page"] = in_view["index"] // settings.page_size + 1
    # the near-duplicate rule the fit used, and how many features were measured, for the page to state
    for name in ("merge_correlated", "merge_min_cosine", "n_measured"):
        info[name] = layer_row[name]
    info["pair_width"] = layer_row["pair_width"]  # the paired dictionary pair_max_cosine is measured in
    label, label_history = labels.current_and_history(settings, run_id, layer, feature)
    # run_version: the run's version now; a label made on an earlier one says so (made_on_current_sae)
    return {"run": run_summary(run), "run_version": run.version, "layer": layer, "feature": info, "contexts": contexts,
            "quantile_contexts": quantiles, "view": view.model_dump(exclude={"page"}), "sort": sort, "in_view": in_view,
            "label": label, "label_history": label_history,
            "explanation": explanations.current(settings, run_id, layer, feature)}


# The two feature routes run on the event loop (async def), not in the thread pool: their work
# is a few ms of CPU -- one card read from the page-cached store, two indexed SQL reads, the
# render -- and the hop to a thread and back, with the GIL handed over twice, cost more than
# that work under load (P5, 8 clients: p95 of the JSON 30-35 ms in threads, 23-26 ms here).
# What they cannot bound: the first j/k lookup in a view not yet kept (one query, <= ~50 ms).
@router.get("/api/runs/{run_id}/layers/{layer}/features/{feature}", tags=["features"])
async def api_feature(run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep, view: TableViewQ) -> dict[str, Any]:
    """One feature: statistics, weight, histogram, top tokens, contexts, nearest features by
    decoder cosine, and its previous/next feature in the table view given by the query."""
    return json_response(feature_data(settings, run_id, layer, feature, view))


@router.get("/runs/{run_id}/layers/{layer}/features/{feature}", response_class=HTMLResponse, include_in_schema=False)
async def feature_page(request: Request, run_id: str, layer: LayerId, feature: FeatureId, settings: SettingsDep, view: TableViewQ):
    return render_feature_page(request, settings, run_id, layer, feature, view)


def render_feature_page(request: Request, settings: Settings, run_id: str, layer: int, feature: int, view: TableView,
                        label_form: dict[str, Any] | None = None, status_code: int = 200):
    """The feature page; `label_form` (label, note, error) re-shows a label edit that was refused."""
    data = feature_data(settings, run_id, layer, feature, view)
    f = data["feature"]
    scale = f["max_activation"] or max((max(c["acts"], default=0) for c in data["contexts"]), default=0)
    return render(request, "feature.html", {
        **data, "view_obj": view, "sort_name": describe_sort(data["sort"]), "scale": scale, "histogram": charts.histogram(f["hist_edges"], f["hist_counts"]),
        "label_names": labels.LABEL_NAMES, "label_form": label_form or {**data["label"], "error": None},
        # where its rendered SAEDashboard page is served (None: none yet), read here, not by the template
        "saedashboard_page": saedashboard_url(request, run_id, layer, feature),
        # the reward-hacking probes' section: the latest probe jobs of this layer and feature
        "probes": feature_probes(request, run_id, layer, feature, f.get("top_token"), data["run_version"]),
    }, status_code=status_code)
