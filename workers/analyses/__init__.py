"""Analyses that run once the per-layer stages are done, over all layers at once. Each module
here declares `STAGE`, a Stage (workers/stages.py): the columns and tables it adds (defined in
backend/core/store_schema.py like every other), the run page's sections that draw them
(backend/web/sections), and `run(ctx: RunContext) -> StageOutput`. The pipeline merges its
output into the tables the store is written from, as it does every per-layer stage's.

A new analysis is one module here, its name in ANALYSES, its section and its template."""
from __future__ import annotations

from importlib import import_module
from typing import Any

from workers.stages import RunContext, Stage, run_stages

ANALYSES: list[str] = [  # module names under workers.analyses, in the order they run
    "pairs",  # paired dictionaries: MMCS (sae.widths)
    "transfer",  # base-model transfer (transfer.base_model)
    "lexicon",  # the implicit-reward lexicon against a reference (lexicon)
    "reason_score",  # ReasonScore of a vocabulary (reason_score)
    "preference",  # preference pairs: margins, wrong pairs, the surrogate RM (a dataset of chosen/rejected)
]


def analysis_stages(names: list[str] | None = None) -> list[Stage]:
    """The analyses' stages; imported when asked for, as they bring torch and their models' code."""
    return [import_module(f"workers.analyses.{name}").STAGE for name in (ANALYSES if names is None else names)]


def check_analyses(config: Any, tokenizer: Any, names: list[str] | None = None) -> None:
    """Before any compute (the model loaded, nothing trained): each analysis's own check, where
    it has one, refuses what it could not use (ConfigError)."""
    for stage in analysis_stages(names):
        if stage.check is not None:
            stage.check(config, tokenizer)


def run_analyses(ctx: RunContext, names: list[str] | None = None) -> dict[str, Any]:
    """Run each analysis, its output merged into ctx.tables; returns the run_info they give."""
    return run_stages(analysis_stages(names), ctx)
