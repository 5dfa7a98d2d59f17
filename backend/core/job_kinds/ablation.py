"""Ablation: features of one layer zeroed, clamped or steered inside the model on held-out or typed
texts, the reward before and after, beside random features of similar frequency given the same edit."""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from backend.core import labels, store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import (MAX_ID, Form, Invalid, JobKind, Target, check_control_pool, check_range,
                                         check_text_length, feature_ids, listed)
from backend.core.rankings import FALLBACK_RANKING, RANKINGS
from backend.core.settings import Settings

MAX_TYPED_TEXTS = 256
MAX_EDITED_FEATURES = 4096  # features one ablation edits at once
# |value| of a clamp or steer: activations and steering multiples are of order 1-100; far beyond
# that the edited residual overflows and the reward comes back as NaN
MAX_EDIT_VALUE = 1e4
FeatureIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]], Field(max_length=MAX_EDITED_FEATURES)]
SELECTIONS = {
    "top_ranked": ("default", "the top {n} features of the layer's default ranking ({ranking})"),
    "top_measured": ("-measured_delta", "the top {n} features by measured Δ when zeroed alone (most negative first)"),
    "top_attribution": ("attribution", "the top {n} features by attribution (activation × gradient; raise the reward most)"),
    "top_positive": ("weight", "the top {n} features by weight (raise the reward most)"),
    "top_negative": ("-weight", "the top {n} features by negative weight (lower the reward most)"),
    "top_abs": ("abs_weight", "the top {n} features by |weight|"),
    "top_effect": ("reward_effect", "the top {n} features by reward effect (gradient along the decoder direction)"),
    "labelled_reward": (None, "every feature labelled reward-related on this layer"),
}


class EditSpec(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    mode: Literal["zero", "clamp", "steer"] = Field(description="zero the features, clamp them to `value`, "
                                                                "or add `value` x their decoder direction")
    value: float | None = Field(None, ge=-MAX_EDIT_VALUE, le=MAX_EDIT_VALUE,
                                description="clamp: the activation; steer: the multiple (required for both)")

    @model_validator(mode="after")
    def _value_for_mode(self):
        if self.mode in ("clamp", "steer") and self.value is None:
            raise ValueError(f"value: {self.mode} needs a number")
        if self.value is not None and not math.isfinite(self.value):
            raise ValueError("value: must be a finite number")
        return self


class AblationRequest(EditSpec):
    tokens: Literal["text", "all"] = Field("text", description="where the edit applies: the text's own tokens "
                                          "(special tokens such as [CLS] left as they are, as the measured "
                                          "effects do), or every token")
    features: FeatureIds = Field(default_factory=list, description="feature ids (or use `selection`)")
    selection: Literal[tuple(SELECTIONS)] | None = Field(None, description="choose features by rule instead")  # type: ignore[valid-type]
    top_n: int = Field(10, ge=1, le=500)
    n_texts: int = Field(256, ge=1, le=2048, description="held-out texts of the run's corpus to evaluate on")
    texts: list[str] | None = Field(None, max_length=MAX_TYPED_TEXTS, description="typed texts instead of held-out ones")
    control: bool = Field(True, description="also ablate random features of similar frequency (n_controls draws)")
    n_controls: int = Field(10, ge=3, le=50, description="random control draws, each as many features as chosen; a "
                            "verdict is stated from 10 on (fewer: the page says undecided)")


def resolve_features(settings: Settings, run_id: str, layer: int, req: AblationRequest) -> tuple[list[int], str]:
    """The feature ids a request names, checked against the layer; and a description."""
    _, path = run_and_store(settings, run_id)
    info = store.layer_info(path, layer)  # NotFound (404) for an unknown layer
    features, described, ranking = list(dict.fromkeys(req.features)), None, None
    if req.selection:
        sort, template = SELECTIONS[req.selection]
        if sort is None:
            labelled = sorted(f for f, row in labels.labels_for_layer(settings, run_id, layer).items()
                              if row["label"] == "reward")
            features = [f for f in labelled if f < info["d_sae"]]  # a label kept past a replace that shrank the layer
            if len(features) < len(labelled):
                template += f" ({len(labelled) - len(features)} on features the layer no longer has left out)"
        else:
            if sort == "default":
                ranking = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING]
                sort = ranking.sort
            features = [r["feature"] for r in store.features(path, layer, sort=sort, limit=req.top_n).rows
                        if not sort.endswith("measured_delta") or r.get("measured_delta") is not None]
        described = template.format(n=req.top_n, ranking=ranking.label if ranking else "")
    if not features:
        raise Invalid("no features selected: pick some in the table, or a rule that selects at least one", "features")
    check_range(features, info, layer, "features")
    return features, described or f"feature{'s' if len(features) > 1 else ''} {listed(features)}"


def prepare(settings: Settings, target: Target, req: AblationRequest) -> dict:
    run_id, layer = target.run_id, target.layer
    features, described = resolve_features(settings, run_id, layer, req)
    if req.control:
        info = store.layer_info(run_and_store(settings, run_id)[1], layer)
        check_control_pool(len(features), info["d_sae"], "features")
    texts = req.texts
    if texts is not None:
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise Invalid("no evaluation texts: type at least one, or evaluate on held-out texts", "texts")
        check_text_length(settings, texts, "texts")
    return {"run_id": run_id, "layer": layer, "features": features, "mode": req.mode, "value": req.value,
            "tokens": req.tokens, "selection": req.selection, "n_texts": req.n_texts, "texts": texts,
            "control": req.control, "n_controls": req.n_controls, "described": described}


def edit_fields(form: Form) -> dict:
    """The edit a form names (ablation, and a text's edit): mode, value and the features."""
    return {"mode": form.get("mode", "zero"), "value": form.get("value"), "selection": form.get("selection"),
            "tokens": form.get("tokens", "text"), "top_n": form.get("top_n", 10),
            "features": feature_ids(form.getlist("features"), "features", MAX_EDITED_FEATURES)}


def form_fields(form: Form) -> dict:
    data = edit_fields(form)
    if form.get("eval") == "typed":
        data["texts"] = form.text("texts").splitlines()
    else:
        data["n_texts"] = form.get("n_texts", 256)
    return {**data, "control": form.ticked("control"), "n_controls": form.get("n_controls", 10)}


def result_number(job: dict) -> tuple[str, float] | None:
    mean = ((job.get("result") or {}).get("summary") or {}).get("mean_delta")
    return None if mean is None else ("mean Δ", mean)


KIND = JobKind(
    name="ablation", title="Ablation", request=AblationRequest, prepare=prepare, task="workers.tasks:ablation_task",
    api_path="/api/runs/{run_id}/layers/{layer}/ablations",
    api_doc="Queue an ablation of features of one layer; poll GET /api/jobs/{id} (the Location) for the result.",
    form_path="/runs/{run_id}/layers/{layer}/ablate", form_partial="_ablate_form.html", form_fields=form_fields,
    result_partial="_job_ablation.html", result_number=result_number)
