"""The run page's sections beyond the per-layer tables. A section is a Section: its name (its
key in `GET /api/runs/{run}`), the analysis stage whose store output it draws (a module of
workers/analyses, by name: the web app never imports the workers), a data function
(settings, run row, store path) -> its JSON (None: nothing to show), one module each here, and
its template frontend/templates/_run_<name>.html.

A new section is its module here and one line in SECTIONS; tests/test_stages.py checks that
every analysis's sections are here and every section's analysis declares it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from backend.core.settings import Settings
from backend.web.sections import irm, lexicon, mmcs, preference, transfer


@dataclass(frozen=True)
class Section:
    name: str
    analysis: str | None  # the stage (workers/analyses/<analysis>.py) it draws; None: drawn from jobs, not the store
    data: Callable[[Settings, sa.Row, Path], Any]

    @property
    def template(self) -> str:
        return f"_run_{self.name}.html"


SECTIONS: tuple[Section, ...] = (  # in the order the run page shows them
    Section("irm_ablation", None, irm.irm_section),  # the reward-labelled features' ablation jobs
    Section("divergence", "transfer", transfer.divergence_section),
    Section("transfer", "transfer", transfer.transfer_section),
    Section("mmcs", "pairs", mmcs.mmcs_section),
    Section("lexicon", "lexicon", lexicon.lexicon_section),
    Section("preference", "preference", preference.preference_section),
)


def run_sections(settings: Settings, run: sa.Row, path: Path) -> dict[str, Any]:
    return {section.name: section.data(settings, run, path) for section in SECTIONS}
