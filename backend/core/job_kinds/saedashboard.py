"""SAEDashboard's own page for one feature, rendered by the `sae-dashboard` package from the run's
SAE and reward model, then served from the run's folder."""
from __future__ import annotations

from pydantic import BaseModel, Field

from backend.core.exports import ExportError
from backend.core.exports.source import chosen_features, open_layer, require_sae
from backend.core.job_kinds.base import Form, Invalid, JobKind, Target
from backend.core.settings import Settings

MAX_DASHBOARD_TEXTS = 20_000


class DashboardRequest(BaseModel):
    n_texts: int = Field(1024, ge=1, le=MAX_DASHBOARD_TEXTS,
                         description="the run's corpus texts (by id) SAEDashboard reads the feature on")


def prepare(settings: Settings, target: Target, req: DashboardRequest) -> dict:
    """Refused (4xx, no job) for an unknown run, layer or feature, or a layer whose SAE is not on disk."""
    source = open_layer(settings, target.run_id, target.layer)
    try:
        chosen_features(source, [target.feature])
        require_sae(source)
    except ExportError as exc:
        raise Invalid(str(exc), "feature", exc.status) from None
    return {"run_id": target.run_id, "layer": target.layer, "feature": target.feature, "n_texts": req.n_texts,
            "run_version": source.run.version}


def form_fields(form: Form) -> dict:
    return {"n_texts": form.get("n_texts", 1024)}


KIND = JobKind(
    name="saedashboard", title="SAEDashboard page", request=DashboardRequest, prepare=prepare,
    task="workers.exports.saedashboard:saedashboard_task",
    api_path="/api/runs/{run_id}/layers/{layer}/features/{feature}/saedashboards",
    api_doc="Queue SAEDashboard's page for one feature, rendered from the run's SAE and reward model; poll "
            "GET /api/jobs/{id} (the Location): once done, `result.url` serves it.",
    form_path="/runs/{run_id}/layers/{layer}/features/{feature}/saedashboard", form_partial="_saedashboard_form.html",
    form_fields=form_fields, result_partial="_job_saedashboard.html")
