"""The run page's analyses beyond the per-layer tables, one module each: a section is a name,
a function (settings, run row, store path) -> its JSON (None: nothing to show) and a template
frontend/templates/_run_<name>.html. `GET /api/runs/{run}` carries each under its name.

A new analysis is added here, in one line, and nowhere else in the run page's code."""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from backend.core.settings import Settings

# name -> "module:function" under backend.web.sections, in the order the run page shows them
SECTIONS: dict[str, str] = {
    "irm_ablation": "irm:irm_section",
    "divergence": "transfer:divergence_section",
    "transfer": "transfer:transfer_section",
    "mmcs": "mmcs:mmcs_section",
    "lexicon": "lexicon:lexicon_section",
    "preference": "preference:preference_section",
}


def _function(spec: str) -> Callable[[Settings, sa.Row, Path], Any]:
    module, name = spec.split(":")
    return getattr(import_module(f"backend.web.sections.{module}"), name)


def run_sections(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any]:
    return {name: _function(spec)(settings, run, path) for name, spec in SECTIONS.items()}
