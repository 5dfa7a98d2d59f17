"""The pairs browser of a run on preference pairs: each pair's chosen and rejected text as the
model read them, both scores, the margin and whether the RM got it right, linked to the two
texts' pages; filtered by split and to the pairs the RM orders wrongly, which list the features
that pushed them toward the rejected side at each layer."""
from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.core import preference, store
from backend.web.routes.common import Blank, SettingsDep, get_run, render, run_summary, store_path
from backend.web.routes.edge import ERROR_RESPONSES, MAX_ID, StrictJSONRoute
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)


class PairsView(BaseModel):
    """Which pairs the browser lists, and which page of them."""
    model_config = ConfigDict(extra="ignore")

    split: Literal[preference.SPLITS] | Blank | None = Field(  # type: ignore[valid-type]
        None, description="only held-out ('heldout') or training ('train') pairs; none: both")
    wrong: bool = Field(False, description="only the pairs the RM orders wrongly (margin <= 0)")
    page: int = Field(1, ge=1, le=MAX_ID, description="1-based page number")

    @field_validator("split", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def query(self, **changes: Any) -> str:
        values = {"split": self.split, "wrong": "true" if self.wrong else None, "page": self.page, **changes}
        return urlencode({k: v for k, v in values.items() if v not in (None, 1)})


PairsViewQ = Annotated[PairsView, Depends()]


def pairs_data(settings: Settings, run_id: str, view: PairsView) -> dict[str, Any]:
    run = get_run(settings, run_id)
    path = store_path(settings, run)
    summary = preference.summary(path)
    if summary is None:
        raise store.NotFound(f"run {run_id!r} has no preference pairs: its dataset is a text corpus (pairs come from "
                             "a dataset with chosen and rejected columns)")
    size = settings.page_size
    rows, total = preference.pairs_page(path, view.split, view.wrong, size, (view.page - 1) * size)
    n_pages = max(1, -(-total // size))
    if view.page > n_pages:
        raise store.NotFound(f"page {view.page} not found: this view of the pairs has {n_pages} page(s)")
    pushed = preference.wrong_features(path, [r["pair_id"] for r in rows if not r["correct"]])
    pairs = [{
        "pair_id": r["pair_id"], "row": r["row"], "split": r["split"], "margin": r["margin"], "correct": r["correct"],
        "chosen": {"text_id": r["chosen_text_id"], "text": r["chosen_text"], "score": r["chosen_score"]},
        "rejected": {"text_id": r["rejected_text_id"], "text": r["rejected_text"], "score": r["rejected_score"]},
        # per layer, the features whose attribution to the margin was most negative
        "wrong_side_features": [{"layer": layer, "features": features}
                                for layer, features in sorted(pushed.get(r["pair_id"], {}).items())],
    } for r in rows]
    return {"run": run_summary(run), "preference": summary, "view": view.model_dump(), "page_size": size,
            "n_pages": n_pages, "total": total, "pairs": pairs}


@router.get("/api/runs/{run_id}/pairs", tags=["runs"])
def api_pairs(run_id: str, settings: SettingsDep, view: PairsViewQ) -> dict[str, Any]:
    """One page of a preference-pair run's pairs (pair order): both texts as the model read them,
    both scores, the margin, whether the RM got it right, and for a wrongly ordered held-out pair
    the features that pushed it toward the rejected side at each layer. 404 for a text-corpus run."""
    return pairs_data(settings, run_id, view)


@router.get("/runs/{run_id}/pairs", response_class=HTMLResponse, include_in_schema=False)
def pairs_page(request: Request, run_id: str, settings: SettingsDep, view: PairsViewQ):
    return render(request, "pairs.html", {**pairs_data(settings, run_id, view), "view_obj": view})
