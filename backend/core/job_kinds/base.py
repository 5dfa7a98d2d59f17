"""What a job kind is: one declaration holds its request (fields and defaults, once), the checks a
request passes before a job is queued, the worker's task (by name: the web app never imports it),
its routes, its form and result templates, and what the jobs list says of it. The web app's routes,
job page and jobs list, and the worker, are generic over these declarations (job_kinds/__init__.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import BaseModel

from backend.core.settings import Settings


@dataclass(frozen=True)
class Target:
    """What the request's URL names: its run, layer and feature (None where the path has none)."""
    run_id: str | None = None
    layer: int | None = None
    feature: int | None = None


class Invalid(ValueError):
    """A request the store or the settings refute (a feature the layer lacks, nothing selected):
    a 4xx (422 naming `field`, unless `status` says otherwise), and no job."""

    def __init__(self, message: str, field: str, status: int = 422):
        super().__init__(message)
        self.field, self.status = field, status


class Form:
    """A submitted HTML form as a kind's `form_fields` reads it: one value, or every value of a field."""

    def __init__(self, values: Mapping[str, str], lists: Callable[[str], list[str]]):
        self._values, self._lists = values, lists

    def get(self, name: str, default: Any = None) -> Any:
        value = self._values.get(name)
        return default if value is None or (isinstance(value, str) and not value.strip()) else value

    def text(self, name: str) -> str:
        """A text as typed (blanks kept: the request says what is wrong with them)."""
        return self._values.get(name) or ""

    def getlist(self, name: str) -> list[str]:
        return list(self._lists(name))

    def ticked(self, name: str) -> bool:
        return self._values.get(name) == "on"  # an unticked box is simply absent


@dataclass(frozen=True)
class JobKind:
    name: str  # the job's `kind` in the database
    title: str  # in words: the jobs list and the job page
    request: type[BaseModel]  # the JSON body the API takes (and a form's fields are parsed into)
    prepare: Callable[[Settings, Target, Any], dict]  # checks the request against the store: the job's params
    task: str  # "module:function" the worker runs; imported by the worker only (it loads torch)
    api_path: str  # POST here with the request as JSON: 201 and the job
    api_doc: str  # the API route's description
    result_partial: str  # the job page's section for this kind (frontend/templates)
    form_path: str | None = None  # POST here from the page's form: a redirect to the job's page
    form_partial: str | None = None  # the form, included by the page it belongs to
    form_fields: Callable[[Form], dict] | None = None  # the form's fields as the request's data
    result_number: Callable[[dict], tuple[str, float] | None] | None = None  # the jobs list's one number
    api_tag: str = "jobs"

    def path_names(self, path: str) -> list[str]:
        return re.findall(r"\{(\w+)\}", path)


# --- checks several kinds share ----------------------------------------------------------------

FEATURE_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() also passes "²" and "١٢"
# SQL keeps layer, feature and job ids in INTEGER columns (4 bytes on PostgreSQL); the store's
# card key packs layer and feature into one 64-bit key, 32 bits each
MAX_ID = 2**31 - 1


def feature_ids(values: list, field: str, limit: int) -> list[int]:
    """Feature ids typed into a form field (separated by commas or spaces), each checked."""
    ids = []
    for raw in values:
        for part in str(raw).replace(",", " ").split():
            if not FEATURE_ID.fullmatch(part) or int(part) > MAX_ID:
                raise Invalid(f"{part[:40]!r} is not a feature id (a whole number from 0)", field)
            ids.append(int(part))
    ids = list(dict.fromkeys(ids))
    if len(ids) > limit:
        raise Invalid(f"{len(ids):,} features given; at most {limit:,} at once", field)
    return ids


def check_range(features: list[int], info: dict, layer: int, field: str) -> None:
    out_of_range = [f for f in features if not 0 <= f < info["d_sae"]]
    if out_of_range:
        raise Invalid(f"feature {out_of_range[0]} is out of range: layer {layer} has features 0–{info['d_sae'] - 1}",
                      field)


def check_control_pool(n_chosen: int, d_sae: int, field: str) -> None:
    """Each control draw is as many other features as chosen (workers/controls.py): more than half
    the layer leaves too few, and the job would fail on the worker."""
    if n_chosen > d_sae - n_chosen:
        raise Invalid(f"{n_chosen:,} features chosen of the layer's {d_sae:,} leaves {d_sae - n_chosen:,} for each "
                      f"random control draw, which needs as many as are chosen: choose at most {d_sae // 2:,}, or "
                      "turn the controls off (control: false)", field)


def check_text_length(settings: Settings, texts: list[str], field: str) -> None:
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            which = "the text" if len(texts) == 1 else f"text {i + 1} of {len(texts)}"
            raise Invalid(f"{which} has {len(text):,} characters; the limit is {settings.max_text_chars:,} "
                          "(RA_MAX_TEXT_CHARS)", field)


def listed(ids: list[int], shown: int = 20) -> str:
    return ", ".join(map(str, ids[:shown])) + ("…" if len(ids) > shown else "")
