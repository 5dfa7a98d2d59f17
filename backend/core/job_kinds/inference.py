"""A text (typed, or a corpus text): its reward, the score's attribution over the SAE features of
chosen layers, per-token activations and, with an edit, the reward after it."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from backend.core import store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.ablation import AblationRequest, edit_fields, resolve_features
from backend.core.job_kinds.base import (MAX_ID, Form, Invalid, JobKind, Target, check_range, check_text_length,
                                         feature_ids)
from backend.core.rankings import FALLBACK_RANKING, RANKINGS
from backend.core.settings import Settings

MAX_SHOWN_FEATURES = 32  # features a text's page shades token by token (each is a row of the page)
MAX_ATTRIBUTION_STEPS = 64
TextIdField = Field(None, ge=0, le=MAX_ID, description="a corpus text's id: score that text (then leave `text` out)")
StepsField = Field(16, ge=0, le=MAX_ATTRIBUTION_STEPS, description="integrated-gradients steps for the text's "
                   "attribution (complete: contributions add up to score − the score with the layer's features "
                   "zeroed); 0: first order, activation × gradient")


def not_blank(text: str | None) -> str | None:
    if text is not None and not text.strip():
        raise ValueError("type a text")
    return text


class InferenceRequest(BaseModel):
    text: str | None = Field(None, min_length=1)
    text_id: int | None = TextIdField
    features: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]], Field(max_length=MAX_SHOWN_FEATURES)] = Field(
        default_factory=list, description="features to show per token (default: the 8 that contribute most to this "
        f"text's score; at most {MAX_SHOWN_FEATURES})")
    steps: int = StepsField
    attribution_layers: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]], Field(max_length=64)] | None = Field(
        None, description="layers to attribute the score at (default: this layer)")
    edit: AblationRequest | None = None

    _not_blank = field_validator("text")(not_blank)

    @model_validator(mode="after")
    def _one_text(self):
        if (self.text is None) == (self.text_id is None):
            raise ValueError("give either `text` or `text_id` (a corpus text), not both" if self.text is not None
                             else "type a text, or name a corpus text by `text_id`")
        return self


def corpus_text(settings: Settings, run_id: str, text_id: int, field: str) -> str:
    """A corpus text by id, for a job that names it (NotFound when the run has no such text)."""
    try:
        return store.text(run_and_store(settings, run_id)[1], text_id)["text"]
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc} ({field})") from None


def prepare(settings: Settings, target: Target, req: InferenceRequest) -> dict:
    run_id, layer = target.run_id, target.layer
    text = req.text if req.text_id is None else corpus_text(settings, run_id, req.text_id, "text_id")
    check_text_length(settings, [text], "text")
    path = run_and_store(settings, run_id)[1]
    info = store.layer_info(path, layer)
    shown = list(dict.fromkeys(req.features))
    check_range(shown, info, layer, "features")
    attribution_layers = list(dict.fromkeys(req.attribution_layers or [layer]))
    known = {row["layer"] for row in store.layers(path)}
    unknown = [x for x in attribution_layers if x not in known]
    if unknown:
        raise Invalid(f"layer {unknown[0]} has no SAE in this run (its layers: {', '.join(map(str, sorted(known)))})",
                      "attribution_layers")
    # without a gradient (a score computed from the text) the worker has no attribution to rank
    # by and shows the layer's default ranking, the one that holds up under ablation
    default_sort = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING].sort
    fallback = [r["feature"] for r in store.features(path, layer, sort=default_sort, limit=8).rows]
    params: dict[str, Any] = {"run_id": run_id, "layer": layer, "text": text, "text_id": req.text_id,
                              "features": shown, "fallback_features": fallback, "steps": req.steps,
                              "attribution_layers": attribution_layers}
    if req.edit is not None:
        edit_features, described = resolve_features(settings, run_id, layer, req.edit)
        params["edit"] = {"features": edit_features, "mode": req.edit.mode, "value": req.edit.value,
                          "tokens": req.edit.tokens, "described": described}
    return params


def form_fields(form: Form) -> dict:
    data: dict[str, Any] = {"features": feature_ids([form.get("shown", "")], "shown", MAX_SHOWN_FEATURES),
                            "steps": form.get("steps", 16)}
    if form.get("text_id") is not None:
        data["text_id"] = form.get("text_id")
    else:
        data["text"] = form.text("text")
    if form.get("mode"):
        data["edit"] = edit_fields(form)
    return data


def result_number(job: dict) -> tuple[str, float] | None:
    reward = (job.get("result") or {}).get("reward")
    return None if reward is None else ("reward", reward)


KIND = JobKind(
    name="inference", title="Text attribution", request=InferenceRequest, prepare=prepare,
    task="workers.tasks:inference_task", api_path="/api/runs/{run_id}/layers/{layer}/texts",
    api_doc="Queue a text (typed, or a corpus text by `text_id`): its reward, its score's attribution over the SAE "
            "features of the chosen layers, per-token activations and, with `edit`, the edited reward.",
    form_path="/runs/{run_id}/layers/{layer}/text", form_partial="_text_form.html", form_fields=form_fields,
    result_partial="_job_inference.html", result_number=result_number)
