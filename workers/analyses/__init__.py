"""Analyses that run once the per-layer tables are built: each module here has
`run(ctx: RunContext) -> AnalysisOutput` and is named in ANALYSES. Its columns and tables are
declared in backend/core/store_schema.py like every other; the pipeline merges its output into the
tables the store is written from (a column given twice is an error, as between stages).

A new analysis is one module and one line in ANALYSES."""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Callable

ANALYSES: list[str] = [  # module names under workers.analyses, in the order they run
    "pairs",  # paired dictionaries: MMCS (sae.widths)
    "transfer",  # base-model transfer (transfer.base_model)
    "lexicon",  # the implicit-reward lexicon against a reference (lexicon)
    "reason_score",  # ReasonScore of a vocabulary (reason_score)
    "preference",  # preference pairs: margins, wrong pairs, the surrogate RM (a dataset of chosen/rejected)
]


@dataclass
class RunContext:
    """What the pipeline has when the analyses run. `tables` are the store's tables built so
    far (column lists; `layers` and `features` in config.layers order)."""
    config: Any
    settings: Any
    adapter: Any  # the reward model
    corpus: Any
    acts: Any  # workers/analyze.py CorpusActivations
    saes: dict[int, Any]
    run_dir: Path  # the staging run directory: files an analysis saves go under it
    device: Any
    tables: dict[str, dict[str, list]]
    stage: Callable[[str], None] = print
    progress: Callable[[float], None] = lambda fraction: None


@dataclass
class AnalysisOutput:
    layer_columns: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> extra `layers` columns
    feature_columns: dict[int, dict[str, list]] = field(default_factory=dict)  # layer -> extra `features` columns
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # tables of its own
    run_info: dict[str, str] = field(default_factory=dict)


def check_analyses(config: Any, tokenizer: Any, names: list[str] | None = None) -> None:
    """Before any compute (the model loaded, nothing trained): each analysis's own
    `check(config, tokenizer)`, where it has one, refuses what it could not use (ConfigError)."""
    for name in ANALYSES if names is None else names:
        check = getattr(import_module(f"workers.analyses.{name}"), "check", None)
        if check is not None:
            check(config, tokenizer)


def run_analyses(ctx: RunContext, names: list[str] | None = None) -> None:
    """Run each analysis and merge its output into ctx.tables (and run_info into tables'
    companion dict `ctx.tables["_run_info"]`), reporting progress across them."""
    names = ANALYSES if names is None else names
    for i, name in enumerate(names):
        share = (lambda i: lambda f: ctx.progress((i + min(max(f, 0.0), 1.0)) / len(names)))(i)
        module = import_module(f"workers.analyses.{name}")
        output = module.run(RunContext(**{**ctx.__dict__, "progress": share}))
        merge(ctx.tables, output, list(ctx.config.layers))
        ctx.tables.setdefault("_run_info", {}).update(output.run_info)
        share(1.0)


def merge(tables: dict[str, dict[str, list]], output: AnalysisOutput, layers: list[int]) -> None:
    """An analysis's columns into the tables, layer by layer in `layers` order."""
    _add_columns(tables["layers"], {name: [output.layer_columns.get(layer, {}).get(name) for layer in layers]
                                    for name in _names(output.layer_columns)})
    n_features = _features_per_layer(tables["features"], layers)
    columns: dict[str, list] = {}
    for name in _names(output.feature_columns):
        values: list = []
        for layer in layers:
            given = output.feature_columns.get(layer, {}).get(name)
            if given is not None and len(given) != n_features[layer]:
                raise ValueError(f"column {name}: {len(given)} values for layer {layer}'s {n_features[layer]} features")
            values.extend([None] * n_features[layer] if given is None else list(given))
        columns[name] = values
    _add_columns(tables["features"], columns)
    for name, table in output.tables.items():
        if name in tables:
            raise ValueError(f"table {name} comes from two analyses")
        tables[name] = table


def _names(per_layer: dict[int, dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for columns in per_layer.values() for name in columns))


def _features_per_layer(features: dict[str, list], layers: list[int]) -> dict[int, int]:
    column = features["layer"]
    return {layer: sum(1 for x in column if x == layer) for layer in layers}


def _add_columns(table: dict[str, list], columns: dict[str, list]) -> None:
    twice = table.keys() & columns.keys()
    if twice:
        raise ValueError(f"columns {', '.join(sorted(twice))} come from two stages")
    length = len(next(iter(table.values()))) if table else 0
    for name, values in columns.items():
        if len(values) != length:
            raise ValueError(f"column {name}: {len(values)} values for {length} rows")
        table[name] = values
