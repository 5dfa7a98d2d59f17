"""Jobs: the queue page, one job's page (ablation results, custom-text results), and the
forms and JSON endpoints that submit them. Every submission is validated here, so a bad
request gets a 4xx with a message and creates no job."""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backend.web import ablation_examples, charts

from backend.core import jobs, store
from backend.web.access import check_csrf, current_author, named_users
from backend.core.rankings import FALLBACK_RANKING, RANKINGS, barely_reaches, reads_one_token
from backend.web.routes.common import SettingsDep, get_run, render, store_path
from backend.web.routes.edge import (ERROR_RESPONSES, MAX_ID, JobId, LayerId, StrictJSONRoute, invalid,
                                 media_type)
from backend.core.settings import Settings

router = APIRouter(route_class=StrictJSONRoute, responses=ERROR_RESPONSES)

MAX_TYPED_TEXTS = 256
MAX_EDITED_FEATURES = 4096  # features one ablation edits at once
MAX_SHOWN_FEATURES = 32  # features a custom text's page shades token by token (each is a row of the page)
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


MAX_ATTRIBUTION_STEPS = 64
TextIdField = Field(None, ge=0, le=MAX_ID, description="a corpus text's id: score that text (then leave `text` out)")
StepsField = Field(16, ge=0, le=MAX_ATTRIBUTION_STEPS, description="integrated-gradients steps for the text's "
                   "attribution (complete: contributions add up to score − the score with the layer's features "
                   "zeroed); 0: first order, activation × gradient")


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

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("type a text")
        return text

    @model_validator(mode="after")
    def _one_text(self):
        if (self.text is None) == (self.text_id is None):
            raise ValueError("give either `text` or `text_id` (a corpus text), not both" if self.text is not None
                             else "type a text, or name a corpus text by `text_id`")
        return self


class DiffRequest(BaseModel):
    text_a: str | None = Field(None, min_length=1, description="the first text (or name it by `text_id_a`)")
    text_id_a: int | None = Field(None, ge=0, le=MAX_ID, description="a corpus text as the first text")
    text_b: str = Field(min_length=1, description="the second text: an edit of the first")
    steps: int = StepsField

    @field_validator("text_a", "text_b")
    @classmethod
    def _not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise ValueError("type a text")
        return text

    @model_validator(mode="after")
    def _one_first_text(self):
        if (self.text_a is None) == (self.text_id_a is None):
            raise ValueError("give either `text_a` or `text_id_a`, not both" if self.text_a is not None
                             else "give the first text as `text_a`, or name a corpus text by `text_id_a`")
        return self


class PipelineRequest(BaseModel):
    config_yaml: str = Field(min_length=1, max_length=100_000)
    replace: bool = False


def _check_text_length(settings: Settings, texts: list[str], field: str) -> None:
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            which = "the text" if len(texts) == 1 else f"text {i + 1} of {len(texts)}"
            raise invalid(f"{which} has {len(text):,} characters; the limit is {settings.max_text_chars:,} "
                          "(RA_MAX_TEXT_CHARS)", field)


def _resolve_features(settings: Settings, run_id: str, layer: int, req: AblationRequest) -> tuple[list[int], str]:
    """The feature ids a request names, checked against the layer; and a description."""
    path = store_path(settings, get_run(settings, run_id))
    info = store.layer_info(path, layer)  # 404 for an unknown layer
    features, described, ranking = list(dict.fromkeys(req.features)), None, None
    if req.selection:
        sort, template = SELECTIONS[req.selection]
        if sort is None:
            from backend.core import labels

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
        raise invalid("no features selected: pick some in the table, or a rule that selects at least one", "features")
    _check_range(features, info, layer, "features")
    return features, described or f"feature{'s' if len(features) > 1 else ''} {', '.join(map(str, features[:20]))}" \
        + ("…" if len(features) > 20 else "")


def _check_range(features: list[int], info: dict, layer: int, field: str) -> None:
    out_of_range = [f for f in features if not 0 <= f < info["d_sae"]]
    if out_of_range:
        raise invalid(f"feature {out_of_range[0]} is out of range: layer {layer} has features 0–{info['d_sae'] - 1}",
                      field)


def check_control_pool(n_chosen: int, d_sae: int, field: str) -> None:
    """Each control draw is as many other features as chosen (workers/controls.py): more than half
    the layer leaves too few, and the job would fail on the worker."""
    if n_chosen > d_sae - n_chosen:
        raise invalid(f"{n_chosen:,} features chosen of the layer's {d_sae:,} leaves {d_sae - n_chosen:,} for each "
                      f"random control draw, which needs as many as are chosen: choose at most {d_sae // 2:,}, or "
                      "turn the controls off (control: false)", field)


def submit_ablation(settings: Settings, run_id: str, layer: int, req: AblationRequest, author: str) -> dict:
    features, described = _resolve_features(settings, run_id, layer, req)
    if req.control:
        info = store.layer_info(store_path(settings, get_run(settings, run_id)), layer)
        check_control_pool(len(features), info["d_sae"], "features")
    if req.texts is not None:
        req.texts = [t for t in req.texts if t.strip()]
        if not req.texts:
            raise invalid("no evaluation texts: type at least one, or evaluate on held-out texts", "texts")
        _check_text_length(settings, req.texts, "texts")
    params = {"run_id": run_id, "layer": layer, "features": features, "mode": req.mode, "value": req.value,
              "tokens": req.tokens, "selection": req.selection,
              "n_texts": req.n_texts, "texts": req.texts, "control": req.control, "n_controls": req.n_controls,
              "described": described}
    return _submit(settings, "ablation", params, author, run_id)


def corpus_text(settings: Settings, run_id: str, text_id: int, field: str) -> str:
    """A corpus text by id, for a job that names it (404 when the run has no such text)."""
    try:
        return store.text(store_path(settings, get_run(settings, run_id)), text_id)["text"]
    except store.NotFound as exc:
        raise store.NotFound(f"run {run_id!r}: {exc} ({field})") from None


def submit_inference(settings: Settings, run_id: str, layer: int, req: InferenceRequest, author: str) -> dict:
    text = req.text if req.text_id is None else corpus_text(settings, run_id, req.text_id, "text_id")
    _check_text_length(settings, [text], "text")
    path = store_path(settings, get_run(settings, run_id))
    info = store.layer_info(path, layer)
    shown = list(dict.fromkeys(req.features))
    _check_range(shown, info, layer, "features")
    attribution_layers = list(dict.fromkeys(req.attribution_layers or [layer]))
    known = {row["layer"] for row in store.layers(path)}
    unknown = [x for x in attribution_layers if x not in known]
    if unknown:
        raise invalid(f"layer {unknown[0]} has no SAE in this run (its layers: {', '.join(map(str, sorted(known)))})",
                      "attribution_layers")
    # without a gradient (a score computed from the text) the worker has no attribution to rank
    # by and shows the layer's default ranking, the one that holds up under ablation
    default_sort = RANKINGS[info.get("default_ranking") or FALLBACK_RANKING].sort
    fallback = [r["feature"] for r in store.features(path, layer, sort=default_sort, limit=8).rows]
    params: dict[str, Any] = {"run_id": run_id, "layer": layer, "text": text, "text_id": req.text_id,
                              "features": shown, "fallback_features": fallback, "steps": req.steps,
                              "attribution_layers": attribution_layers}
    if req.edit is not None:
        edit_features, described = _resolve_features(settings, run_id, layer, req.edit)
        params["edit"] = {"features": edit_features, "mode": req.edit.mode, "value": req.edit.value,
                          "tokens": req.edit.tokens, "described": described}
    return _submit(settings, "inference", params, author, run_id)


def submit_diff(settings: Settings, run_id: str, layer: int, req: DiffRequest, author: str) -> dict:
    text_a = req.text_a if req.text_id_a is None else corpus_text(settings, run_id, req.text_id_a, "text_id_a")
    _check_text_length(settings, [text_a, req.text_b], "text_b")
    store.layer_info(store_path(settings, get_run(settings, run_id)), layer)  # 404 for an unknown layer
    params = {"run_id": run_id, "layer": layer, "text_a": text_a, "text_id_a": req.text_id_a, "text_b": req.text_b,
              "steps": req.steps}
    return _submit(settings, "text_diff", params, author, run_id)


def _submit(settings: Settings, kind: str, params: dict, author: str, run_id: str | None) -> dict:
    try:
        return jobs.submit(settings, kind, params, author, run_id)
    except jobs.JobRejected as exc:
        raise HTTPException(429, str(exc)) from None


def _job_or_404(settings: Settings, job_id: int) -> dict:
    try:
        return jobs.get(settings, job_id)
    except jobs.JobNotFound as exc:
        raise store.NotFound(str(exc)) from None


# --- forms: parse, validate, submit, redirect to the job ---------------------------------

async def _form(request: Request) -> dict[str, Any]:
    form = await request.form()
    check_csrf(request, form.get("csrf_token"))
    return {"_all": form, **{k: v for k, v in form.items()}}


_FEATURE_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also passes "²" and "١٢"


def _feature_ids(values: list, field: str, limit: int) -> list[int]:
    """Feature ids typed into a form field (separated by commas or spaces), each checked."""
    ids = []
    for raw in values:
        for part in str(raw).replace(",", " ").split():
            if not _FEATURE_ID.fullmatch(part) or int(part) > MAX_ID:
                raise invalid(f"{part[:40]!r} is not a feature id (a whole number from 0)", field)
            ids.append(int(part))
    ids = list(dict.fromkeys(ids))
    if len(ids) > limit:
        raise invalid(f"{len(ids):,} features given; at most {limit:,} at once", field)
    return ids


def _parse(model, data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _edit_fields(form: dict) -> dict:
    value = (form.get("value") or "").strip()
    return {"mode": form.get("mode") or "zero", "value": value or None, "selection": form.get("selection") or None,
            "tokens": form.get("tokens") or "text",
            "top_n": form.get("top_n") or 10,
            "features": _feature_ids(form["_all"].getlist("features"), "features", MAX_EDITED_FEATURES)}


@router.post("/runs/{run_id}/layers/{layer}/ablate", include_in_schema=False)
async def ablate_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    data = _edit_fields(form)
    if form.get("eval") == "typed":
        data["texts"] = (form.get("texts") or "").splitlines()
    else:
        data["n_texts"] = form.get("n_texts") or 256
    data["control"] = form.get("control") == "on"  # an unticked box is simply absent
    data["n_controls"] = form.get("n_controls") or 10
    job = submit_ablation(settings, run_id, layer, _parse(AblationRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/runs/{run_id}/layers/{layer}/text", include_in_schema=False)
async def text_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    data: dict[str, Any] = {"features": _feature_ids([form.get("shown") or ""], "shown", MAX_SHOWN_FEATURES),
                            "steps": form.get("steps") or 16}
    if (form.get("text_id") or "").strip():
        data["text_id"] = form["text_id"]
    else:
        data["text"] = form.get("text") or ""
    if form.get("mode"):
        data["edit"] = _edit_fields(form)
    job = submit_inference(settings, run_id, layer, _parse(InferenceRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/runs/{run_id}/layers/{layer}/diff", include_in_schema=False)
async def diff_form(request: Request, run_id: str, layer: LayerId, settings: SettingsDep):
    form = await _form(request)
    data: dict[str, Any] = {"text_b": form.get("text_b") or "", "steps": form.get("steps") or 16}
    if (form.get("text_id_a") or "").strip():
        data["text_id_a"] = form["text_id_a"]
    else:
        data["text_a"] = form.get("text_a") or ""
    job = submit_diff(settings, run_id, layer, _parse(DiffRequest, data), current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


@router.post("/jobs", include_in_schema=False)
async def pipeline_form(request: Request, settings: SettingsDep):
    form = await _form(request)
    req = _parse(PipelineRequest, {"config_yaml": form.get("config_yaml") or "", "replace": form.get("replace") == "on"})
    job = submit_pipeline(settings, req, current_author(request))
    return RedirectResponse(f"/jobs/{job['id']}", status_code=303)


def submit_pipeline(settings: Settings, req: PipelineRequest, author: str) -> dict:
    import yaml

    from backend.core.run_config import ConfigError, parse_config, preflight  # pydantic and JSON only: no torch on the server

    try:
        # every key naming a file, folder, model or dataset is resolved first, and a path outside
        # the input folders (RA_INPUT_DIRS) refused before anything is opened (backend/core/config_keys.py);
        # what would only fail on the worker (an existing run, a missing file, layers or max_length
        # the model lacks, this deployment's limits) is refused here, and no job is made
        config = parse_config(yaml.safe_load(req.config_yaml), input_roots=settings.input_roots)
        preflight(config, settings, req.replace)
    except (ConfigError, yaml.YAMLError, AttributeError) as exc:
        raise invalid(f"invalid config: {exc}", "config_yaml") from None
    return _submit(settings, "pipeline", {"config_yaml": req.config_yaml, "replace": req.replace}, author,
                   config.run_id)


@router.post("/jobs/{job_id}/cancel", include_in_schema=False)
async def cancel_form(request: Request, job_id: JobId, settings: SettingsDep):
    await _form(request)
    _cancel(settings, job_id, current_author(request))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


def _cancel(settings: Settings, job_id: int, author: str) -> dict:
    job = _job_or_404(settings, job_id)
    if named_users(settings) and job["author"] != author:  # with RA_USERS, a job is its author's to stop
        raise HTTPException(403, f"job {job_id} was queued by {job['author']!r}: only its author may cancel it")
    try:
        return jobs.cancel(settings, job_id)
    except jobs.JobRejected as exc:
        raise HTTPException(409, str(exc)) from None


# --- JSON API ------------------------------------------------------------------------------

def _json_only(request: Request, body: bool = True) -> None:
    """Cookie-authenticated JSON writes must be JSON: a cross-site form cannot send that. A
    write without a body (`body` False) may also come without a content type: a form always
    sends one, and the session cookie (SameSite=Lax) does not go with a cross-site fetch."""
    content_type = media_type(request)
    if request.state.header_auth or content_type == "application/json":
        return
    if not body and not content_type and request.headers.get("content-length", "0") == "0":
        return
    raise HTTPException(415, "send the request body as application/json")


@router.post("/api/runs/{run_id}/layers/{layer}/ablations", status_code=201, tags=["jobs"])
def api_ablate(request: Request, response: Response, run_id: str, layer: LayerId, body: AblationRequest,
               settings: SettingsDep) -> dict:
    """Queue an ablation of features of one layer; poll GET /api/jobs/{id} (the Location) for the result."""
    _json_only(request)
    return _created(response, submit_ablation(settings, run_id, layer, body, current_author(request)))


@router.post("/api/runs/{run_id}/layers/{layer}/texts", status_code=201, tags=["jobs"])
def api_text(request: Request, response: Response, run_id: str, layer: LayerId, body: InferenceRequest,
             settings: SettingsDep) -> dict:
    """Queue a text (typed, or a corpus text by `text_id`): its reward, its score's attribution over
    the SAE features of the chosen layers, per-token activations and, with `edit`, the edited reward."""
    _json_only(request)
    return _created(response, submit_inference(settings, run_id, layer, body, current_author(request)))


@router.post("/api/runs/{run_id}/layers/{layer}/diffs", status_code=201, tags=["jobs"])
def api_diff(request: Request, response: Response, run_id: str, layer: LayerId, body: DiffRequest,
             settings: SettingsDep) -> dict:
    """Queue a diff of two texts (a text and an edit of it) at one layer: both scores and
    attributions, the features whose contribution changed most, the tokens aligned."""
    _json_only(request)
    return _created(response, submit_diff(settings, run_id, layer, body, current_author(request)))


@router.post("/api/jobs", status_code=201, tags=["jobs"])
def api_pipeline(request: Request, response: Response, body: PipelineRequest, settings: SettingsDep) -> dict:
    """Queue a pipeline run from a YAML config (validated now, run by a worker)."""
    _json_only(request)
    return _created(response, submit_pipeline(settings, body, current_author(request)))


def _created(response: Response, job: dict) -> dict:
    response.headers["Location"] = f"/api/jobs/{job['id']}"  # where the job's state and result are
    return job


@router.get("/api/jobs", tags=["jobs"])
def api_jobs(settings: SettingsDep, limit: int = Query(100, ge=1, le=500, description="how many jobs")) -> dict:
    """The most recent jobs, newest first (results left out)."""
    return {"jobs": [{k: v for k, v in j.items() if k != "result"} for j in jobs.recent(settings, limit)]}


@router.get("/api/workers", tags=["jobs"])
def api_workers(settings: SettingsDep) -> dict:
    """The live workers (seen within the last seconds) and what each is doing: a queued job runs
    only when one exists."""
    return {"workers": jobs.live_workers(settings)}


@router.get("/api/jobs/{job_id}", tags=["jobs"])
def api_job(job_id: JobId, settings: SettingsDep) -> dict:
    return _job_or_404(settings, job_id)


@router.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
def api_cancel(request: Request, job_id: JobId, settings: SettingsDep) -> dict:
    _json_only(request, body=False)
    return _cancel(settings, job_id, current_author(request))


# --- pages -----------------------------------------------------------------------------------

@router.get("/jobs", response_class=HTMLResponse, include_in_schema=False)
def jobs_page(request: Request, settings: SettingsDep):
    return render(request, "jobs.html", {"jobs": jobs.recent(settings, 200), "workers": jobs.live_workers(settings)})


ExampleSort = Query("delta", description="delta: largest drop first; -delta: largest rise first; abs: largest "
                                        "change first; text: by text id")


def _ablation_rows(job: dict, sort: str) -> list[dict]:
    job_id = job["id"]
    if job["kind"] != "ablation":
        raise HTTPException(404, f"job {job_id} is a {job['kind']} job, not an ablation: it has no examples")
    if not job.get("result"):
        raise HTTPException(409, f"job {job_id} has no result yet ({job['status']})")
    try:
        return ablation_examples.sorted_rows(ablation_examples.example_rows(job["result"]), sort)
    except ValueError as exc:
        raise invalid(str(exc), "sort") from None


@router.get("/api/jobs/{job_id}/examples", tags=["jobs"], responses=ERROR_RESPONSES)
def api_ablation_examples(job_id: JobId, settings: SettingsDep, sort: str = ExampleSort,
                          format: Literal["json", "csv"] = Query("json", description="json, or csv (a download)")):
    """An ablation's per-example results: text, score before and after, measured Δ, and what the
    regression and attribution predicted; all of them, in `sort` order."""
    rows = _ablation_rows(_job_or_404(settings, job_id), sort)
    if format == "csv":
        return StreamingResponse(ablation_examples.csv_lines(rows), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="ablation-{job_id}.csv"'})
    return {"job_id": job_id, "sort": sort, "n": len(rows), "examples": rows}


@router.get("/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
def job_page(request: Request, job_id: JobId, settings: SettingsDep, sort: str = ExampleSort,
             page: int = Query(1, ge=1, le=1_000_000)):
    job = _job_or_404(settings, job_id)
    context: dict[str, Any] = {"job": job, "chart": None, "tokens": None,
                               "workers": jobs.live_workers(settings) if job["status"] in ("queued", "running") else []}
    result = job.get("result") or {}
    if job["kind"] == "ablation" and result:
        examples = _ablation_rows(job, sort)
        context["examples"], context["n_pages"] = ablation_examples.page_of(examples, page)
        context.update(example_sort=sort, example_sorts={k: v[0] for k, v in ablation_examples.SORTS.items()},
                       example_page=page, n_examples=len(examples))
        deltas = [e["delta"] for e in examples]
        control_deltas = [d for c in result.get("controls", []) for d in c["deltas"]]
        context["chart"] = charts.delta_histograms(deltas, control_deltas or None)
        context["agreement"] = _agreement([e["predicted"] for e in examples], deltas)  # order-free
        if all(e.get("attributed") is not None for e in examples):
            context["attribution_agreement"] = _agreement([e["attributed"] for e in examples], deltas)
    if job["kind"] in ("ablation", "inference") and job["run_id"]:
        context["layer_info"] = _layer_or_none(settings, job["run_id"], job["params"].get("layer"))
    if job["kind"] == "inference" and result:
        context["tokens"] = _shaded(result)
    if job["kind"] == "explanations":  # each feature's explanation as the database holds it now
        from backend.web.routes.explanations import job_context

        context.update(job_context(settings, job))
    return render(request, "job.html", context)


def _layer_or_none(settings: Settings, run_id: str, layer: int | None) -> dict | None:
    """The job's layer row, for what the page says about it; None once its run is gone."""
    try:
        info = store.layer_info(store_path(settings, get_run(settings, run_id)), int(layer))
    except (store.NotFound, store.StoreOutdated, TypeError, ValueError):
        return None
    return {**info, "barely_reaches": barely_reaches(info), "reads_one_token": reads_one_token(info)}


def _agreement(predicted: list[float], actual: list[float]) -> float | None:
    """Pearson r of the regression's predicted change with the actual change, per example."""
    n = len(actual)
    if n < 3:
        return None
    mp, ma = sum(predicted) / n, sum(actual) / n
    cov = sum((p - mp) * (a - ma) for p, a in zip(predicted, actual))
    vp = sum((p - mp) ** 2 for p in predicted)
    va = sum((a - ma) ** 2 for a in actual)
    return cov / math.sqrt(vp * va) if vp > 0 and va > 0 else None


def _shaded(result: dict) -> list[dict]:
    """Per shown feature, the text's tokens shaded by that feature (as on feature pages)."""
    rows = []
    for f in result["features"]:
        acts = result["acts"][str(f)]
        after = (result.get("edit") or {}).get("acts_after", {}).get(str(f))
        scale = max(max(acts, default=0.0), max(after or [0.0]), 1e-9)
        rows.append({"feature": f, "peak": max(acts, default=0.0), "scale": scale, "acts": acts, "acts_after": after})
    return rows
