"""Queue the IRM ablation table (backend/web/sections/irm.py): for every layer with features
labelled reward-related, one ablation zeroing them all, with its random controls."""
from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field

from backend.core import store
from backend.core.job_kinds import Target
from backend.core.job_kinds.ablation import AblationRequest
from backend.web.access import current_author
from backend.web.routes.common import SettingsDep, get_run, store_path
from backend.web.routes.edge import ERROR_RESPONSES, StrictJSONRoute
from backend.web.routes.submitting import json_only, parse, read_form, submit
from backend.web.sections.irm import SELECTION, reward_labelled
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)


class IrmRequest(BaseModel):
    n_texts: int = Field(256, ge=1, le=2048, description="held-out texts each layer's ablation is measured on")
    n_controls: int = Field(10, ge=3, le=50, description="frequency-matched random draws per layer (a verdict from 10 on)")


def submit_irm(settings: Settings, run_id: str, req: IrmRequest, author: str) -> list[dict]:
    """One ablation job per layer that has features labelled reward-related; 409 where none has
    (the request is well formed: it is the run's labels that are not there yet)."""
    widths = {x["layer"]: x["d_sae"] for x in store.layers(store_path(settings, get_run(settings, run_id)))}
    labelled = [layer for layer, width in widths.items() if reward_labelled(settings, run_id, layer, width)]
    if not labelled:
        raise HTTPException(409, "no feature of this run is labelled reward-related yet: label some on their pages "
                                 "first")
    body = AblationRequest(mode="zero", selection=SELECTION, n_texts=req.n_texts, n_controls=req.n_controls)
    return [submit(settings, "ablation", Target(run_id, layer), body, author) for layer in labelled]


@router.post("/runs/{run_id}/irm-ablation", include_in_schema=False)
async def irm_form(request: Request, run_id: str, settings: SettingsDep):
    form = await read_form(request)
    req = parse(IrmRequest, {"n_texts": form.get("n_texts", 256), "n_controls": form.get("n_controls", 10)})
    submit_irm(settings, run_id, req, current_author(request))
    return RedirectResponse(f"/runs/{quote(run_id, safe='')}#irm-ablation", status_code=303)


@router.post("/api/runs/{run_id}/irm-ablations", status_code=201, tags=["jobs"])
def api_irm(request: Request, response: Response, run_id: str, body: IrmRequest, settings: SettingsDep) -> dict:
    """Queue the IRM ablation table: per layer with features labelled reward-related, one ablation
    zeroing them all on held-out texts beside random controls (see `irm_ablation` in GET /api/runs/{run})."""
    json_only(request)
    queued = submit_irm(settings, run_id, body, current_author(request))
    response.headers["Location"] = f"/api/runs/{quote(run_id, safe='')}"
    return {"jobs": queued}
