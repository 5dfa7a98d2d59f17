"""A pipeline run from a YAML config: SAEs trained on the chosen layers, every feature's statistics,
rankings and measured effects written to a new feature store."""
from __future__ import annotations

import yaml
from pydantic import BaseModel, Field

from backend.core.job_kinds.base import Form, Invalid, JobKind, Target
from backend.core.run_config import ConfigError, parse_config, preflight
from backend.core.settings import Settings


class PipelineRequest(BaseModel):
    config_yaml: str = Field(min_length=1, max_length=100_000)
    replace: bool = False


def prepare(settings: Settings, target: Target, req: PipelineRequest) -> dict:
    try:
        # every key naming a file, folder, model or dataset is resolved first, and a path outside
        # the input folders (RA_INPUT_DIRS) refused before anything is opened (backend/core/config_keys.py);
        # what would only fail on the worker (an existing run, a missing file, layers or max_length
        # the model lacks, this deployment's limits) is refused here, and no job is made
        config = parse_config(yaml.safe_load(req.config_yaml), input_roots=settings.input_roots)
        preflight(config, settings, req.replace)
    except (ConfigError, yaml.YAMLError, AttributeError) as exc:
        raise Invalid(f"invalid config: {exc}", "config_yaml") from None
    return {"run_id": config.run_id, "config_yaml": req.config_yaml, "replace": req.replace}


def form_fields(form: Form) -> dict:
    return {"config_yaml": form.text("config_yaml"), "replace": form.ticked("replace")}


KIND = JobKind(
    name="pipeline", title="Pipeline run", request=PipelineRequest, prepare=prepare,
    task="workers.tasks:pipeline_task", api_path="/api/jobs",
    api_doc="Queue a pipeline run from a YAML config (validated now, run by a worker).",
    form_path="/jobs", form_partial="_pipeline_form.html", form_fields=form_fields,
    result_partial="_job_pipeline.html")
