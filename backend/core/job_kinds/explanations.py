"""Explanations: chosen features explained (through the configured OpenAI-compatible endpoint, probed
before the job is queued, or offline without one), classified reward-related or not, and scored."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.core import labels, store
from backend.core.exports.source import run_and_store
from backend.core.job_kinds.base import MAX_ID, Form, Invalid, JobKind, Target, feature_ids, listed
from backend.core.llm import Endpoint, LLMError, probe
from backend.core.rankings import FALLBACK_RANKING, RANKINGS
from backend.core.settings import Settings

MAX_FEATURES = 500
MIN_REPLY_TOKENS = 64  # the longest reply a job asks for: 20-50 snippet numbers, or a 200-character explanation
STAGE_NAMES = {"explain": "explain", "classify": "classify reward-related", "score": "score"}


class ExplanationsRequest(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    selection: Literal["top_ranked", "labelled", "features"] = Field(
        "top_ranked", description="top_ranked: the top `top_n` of the layer's default ranking; labelled: every "
        "labelled feature of the layer; features: the ids in `features`")
    top_n: int = Field(20, ge=1, le=MAX_FEATURES)
    features: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(default_factory=list, max_length=MAX_FEATURES)
    stages: list[Literal["explain", "classify", "score"]] = Field(
        ["explain", "classify", "score"], min_length=1, description="what to do, in this order, per feature")
    reward: str = Field("", max_length=300, description="what the reward rewards, in words, for the prompts "
                        "(e.g. 'positive sentiment of a film review')")
    n_texts: int = Field(400, ge=20, le=5000, description="held-out texts the scores draw their snippets from")
    n_snippets: int = Field(10, ge=10, le=50, description="activating and silent snippets per score (each)")
    overwrite: bool = Field(False, description="redo features already done with the same model and prompt version")

    @field_validator("reward")
    @classmethod
    def _one_line(cls, value: str) -> str:
        return " ".join(value.split())


def _selected(settings: Settings, run_id: str, layer: int, req: ExplanationsRequest) -> tuple[list[int], str]:
    path = run_and_store(settings, run_id)[1]
    info = store.layer_info(path, layer)  # NotFound (404) for an unknown layer
    if req.selection == "top_ranked":
        ranking = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING]
        ids = [r["feature"] for r in store.features(path, layer, sort=ranking.sort, limit=req.top_n).rows]
        described = f"the top {req.top_n} features of the layer's default ranking ({ranking.label})"
    elif req.selection == "labelled":
        ids = sorted(f for f in labels.labels_for_layer(settings, run_id, layer) if f < info["d_sae"])
        described = "every labelled feature of the layer"
    else:
        ids = list(dict.fromkeys(req.features))
        described = "features " + listed(ids)
    if not ids:
        raise Invalid("no features selected: tick some in the table, or choose a rule that selects at least one",
                      "features")
    outside = [f for f in ids if f >= info["d_sae"]]
    if outside:
        raise Invalid(f"feature {outside[0]} is out of range: layer {layer} has features 0–{info['d_sae'] - 1}",
                      "features")
    return ids, described


def endpoint_checked(settings: Settings) -> Endpoint | None:
    """The configured endpoint after a probe request; None: the offline explainer. Invalid (422)
    when the probe fails, with the message naming the setting."""
    endpoint = Endpoint.from_settings(settings)
    if endpoint is None:
        return None
    if not endpoint.model:
        raise Invalid("RA_LLM_BASE_URL is set but RA_LLM_MODEL is empty: name the model the endpoint serves", "llm")
    if endpoint.max_tokens < MIN_REPLY_TOKENS:
        raise Invalid(f"RA_LLM_MAX_TOKENS is {endpoint.max_tokens}: an explanation or a list of snippet numbers needs "
                      f"at least {MIN_REPLY_TOKENS} tokens a reply", "llm")
    try:
        probe(endpoint)
    except LLMError as exc:
        raise Invalid(f"the LLM endpoint failed its probe request, so no job was queued: {exc}", "llm") from None
    return endpoint


def prepare(settings: Settings, target: Target, req: ExplanationsRequest) -> dict:
    run_id, layer = target.run_id, target.layer
    features, described = _selected(settings, run_id, layer, req)
    endpoint = endpoint_checked(settings)
    stages = [s for s in STAGE_NAMES if s in req.stages]
    return {"run_id": run_id, "layer": layer, "features": features, "stages": stages,
            "llm": endpoint.describe() if endpoint else None, "reward": req.reward, "n_texts": req.n_texts,
            "n_snippets": req.n_snippets, "overwrite": req.overwrite,
            "run_version": run_and_store(settings, run_id)[0].version,
            "described": f"{' + '.join(STAGE_NAMES[s] for s in stages)}: {described}"}


def resumed(settings: Settings, old: dict) -> dict:
    """A failed or cancelled job's request again, on the endpoint configured now (probed: it may be
    back, or another); the worker skips the features already done."""
    if old["kind"] != "explanations":
        raise Invalid(f"job {old['id']} is a {old['kind']} job: only explanations jobs resume", "job")
    endpoint = endpoint_checked(settings)
    return {**old["params"], "overwrite": False, "resumes": old["id"], "llm": endpoint.describe() if endpoint else None}


def form_fields(form: Form) -> dict:
    return {"selection": form.get("selection", "top_ranked"), "top_n": form.get("top_n", 20),
            "features": feature_ids(form.getlist("features"), "features", MAX_FEATURES),
            "stages": form.getlist("stages"), "reward": form.text("reward"), "n_texts": form.get("n_texts", 400),
            "overwrite": form.ticked("overwrite")}


def result_number(job: dict) -> tuple[str, float] | None:
    done = (job.get("result") or {}).get("features_done")
    return None if done is None else ("features done", done)


KIND = JobKind(
    name="explanations", title="Explanations", request=ExplanationsRequest, prepare=prepare,
    task="workers.explanations.task:explanations_task", api_path="/api/runs/{run_id}/layers/{layer}/explanations",
    api_doc="Queue an explanations job: explain, classify and score the chosen features through the configured LLM "
            "endpoint (RA_LLM_BASE_URL, probed first), or offline without one; poll GET /api/jobs/{id}.",
    form_path="/runs/{run_id}/layers/{layer}/explain", form_partial="_explain_form.html", form_fields=form_fields,
    result_partial="_job_explanations.html", result_number=result_number, api_tag="explanations")
