"""Two texts compared (a text and an edit of it) at one layer: both scores and attributions, the
features whose contribution changed most, the tokens aligned."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import MAX_ID, Form, JobKind, Target, check_text_length
from backend.core.job_kinds.inference import StepsField, corpus_text, not_blank
from backend.core.settings import Settings


class DiffRequest(BaseModel):
    text_a: str | None = Field(None, min_length=1, description="the first text (or name it by `text_id_a`)")
    text_id_a: int | None = Field(None, ge=0, le=MAX_ID, description="a corpus text as the first text")
    text_b: str = Field(min_length=1, description="the second text: an edit of the first")
    steps: int = StepsField

    _not_blank = field_validator("text_a", "text_b")(not_blank)

    @model_validator(mode="after")
    def _one_first_text(self):
        if (self.text_a is None) == (self.text_id_a is None):
            raise ValueError("give either `text_a` or `text_id_a`, not both" if self.text_a is not None
                             else "give the first text as `text_a`, or name a corpus text by `text_id_a`")
        return self


def prepare(settings: Settings, target: Target, req: DiffRequest) -> dict:
    run_id, layer = target.run_id, target.layer
    text_a = req.text_a if req.text_id_a is None else corpus_text(settings, run_id, req.text_id_a, "text_id_a")
    check_text_length(settings, [text_a, req.text_b], "text_b")
    store.layer_info(run_and_store(settings, run_id)[1], layer)  # NotFound (404) for an unknown layer
    return {"run_id": run_id, "layer": layer, "text_a": text_a, "text_id_a": req.text_id_a, "text_b": req.text_b,
            "steps": req.steps}


def form_fields(form: Form) -> dict:
    data: dict[str, Any] = {"text_b": form.text("text_b"), "steps": form.get("steps", 16)}
    if form.get("text_id_a") is not None:
        data["text_id_a"] = form.get("text_id_a")
    else:
        data["text_a"] = form.text("text_a")
    return data


def result_number(job: dict) -> tuple[str, float] | None:
    change = (job.get("result") or {}).get("score_change")
    return None if change is None else ("B − A", change)


KIND = JobKind(
    name="text_diff", title="Two texts compared", request=DiffRequest, prepare=prepare,
    task="workers.tasks:text_diff_task", api_path="/api/runs/{run_id}/layers/{layer}/diffs",
    api_doc="Queue a diff of two texts (a text and an edit of it) at one layer: both scores and attributions, the "
            "features whose contribution changed most, the tokens aligned.",
    form_path="/runs/{run_id}/layers/{layer}/diff", form_partial="_diff_form.html", form_fields=form_fields,
    result_partial="_job_text_diff.html", result_number=result_number)
