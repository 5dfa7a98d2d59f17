"""The one interface of every analysis stage: the per-layer stages the pipeline runs for each
layer (workers/layer_stages.py) and the analyses that run once all layers are done
(workers/analyses/). A stage is a Stage: its name, the store columns and tables it adds (each
defined in backend/core/store_schema.py), the columns it needs from stages before it, the
run page's sections that draw it (backend/web/sections), and `run(ctx) -> StageOutput`.

Its output is merged into the tables the store is written from here, and only here: a column
or table given twice, or one the stage did not declare, is an error."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

Columns = dict[str, list]


@dataclass
class StageOutput:
    layer_columns: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> its `layers` columns
    feature_columns: dict[int, dict[str, list]] = field(default_factory=dict)  # layer -> its `features` columns
    tables: dict[str, Columns] = field(default_factory=dict)  # tables of its own
    run_info: dict[str, Any] = field(default_factory=dict)

    def extend(self, later: StageOutput) -> None:
        """A per-layer stage's output for one more layer: its tables' rows go after the earlier layers'."""
        self.layer_columns.update(later.layer_columns)
        self.feature_columns.update(later.feature_columns)
        for name, columns in later.tables.items():
            table = self.tables.setdefault(name, {})
            for column, values in columns.items():
                table.setdefault(column, []).extend(values)
        self.run_info.update(later.run_info)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], StageOutput]  # per-layer: LayerContext -> that layer's; analysis: RunContext -> all layers'
    sections: tuple[str, ...]  # the run page's sections drawing what it adds (backend/web/sections); () if none
    layer_columns: tuple[str, ...] = ()  # the `layers` columns it adds
    feature_columns: tuple[str, ...] = ()  # the `features` columns it adds
    tables: tuple[str, ...] = ()  # the tables it adds whole
    needs: tuple[str, ...] = ()  # "table.column" that stages before it add (per-layer: the same layer's)
    check: Callable[[Any, Any], None] | None = None  # (config, tokenizer): refuse before any compute (ConfigError)
    share: float = 0.0  # per-layer: its part of a layer's progress bar
    summary: Callable[[dict, dict], str] | None = None  # per-layer: (the layer's row, its features) -> log words


@dataclass
class RunContext:
    """What the pipeline has when the stages run. `tables` are the store's tables built so far
    (column lists; `layers` and `features` in config.layers order)."""
    config: Any
    settings: Any
    adapter: Any  # the reward model
    corpus: Any
    acts: Any  # workers/analyze.py CorpusActivations
    saes: dict[int, Any]
    run_dir: Path  # the staging run directory: files a stage saves go under it
    device: Any
    tables: dict[str, Columns]
    stage: Callable[[str], None] = print
    progress: Callable[[float], None] = lambda fraction: None
    sae_paths: dict[int, Path] = field(default_factory=dict)  # each layer's saved SAE
    recovery: dict[int, Any] = field(default_factory=dict)  # each layer's reward recovered (workers/evaluate.py)
    divergence: dict | None = None  # the parameter divergence measured before training (transfer)

    @cached_property
    def vocab(self) -> np.ndarray:
        """Every token id's string, as the tokenizer spells it."""
        tokenizer = self.adapter.tokenizer
        return np.array(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), dtype=object)


@dataclass
class LayerContext:
    """One layer, for a per-layer stage: `row` and `features` are what the stages before it gave."""
    run: RunContext
    layer: int
    row: dict[str, Any] = field(default_factory=dict)
    features: dict[str, list] = field(default_factory=dict)
    progress: Callable[[float], None] = lambda fraction: None

    @property
    def sae(self):
        return self.run.saes[self.layer]

    @property
    def layer_acts(self):
        return self.run.acts.layers[self.layer]

    def output(self, row: dict | None = None, features: dict | None = None, tables: dict | None = None) -> StageOutput:
        return StageOutput({self.layer: row} if row else {}, {self.layer: features} if features else {}, tables or {})


def part(report: Callable[[float], None], start: float, end: float) -> Callable[[float], None]:
    """Part [start, end] of a progress bar, as a bar of its own."""
    return lambda fraction: report(start + (end - start) * min(max(fraction, 0.0), 1.0))


def frame(layers: list[int], widths: dict[int, int]) -> dict[str, Columns]:
    """The rows every stage's columns go beside: one per layer, one per feature of each layer."""
    return {"layers": {"layer": list(layers)},
            "features": {"layer": [layer for layer in layers for _ in range(widths[layer])],
                         "feature": [f for layer in layers for f in range(widths[layer])]}}


def run_layer_stages(stages: list[Stage], ctx: RunContext) -> None:
    """Each layer through every stage in turn, then each stage's columns into ctx.tables."""
    layers = list(ctx.config.layers)
    outputs = {stage.name: StageOutput() for stage in stages}
    for i, layer in enumerate(layers):
        _run_layer(stages, LayerContext(ctx, layer), part(ctx.progress, i / len(layers), (i + 1) / len(layers)),
                   outputs)
    for stage in stages:
        merge(ctx.tables, outputs[stage.name], layers, stage)


def _run_layer(stages: list[Stage], ctx: LayerContext, report: Callable[[float], None],
               outputs: dict[str, StageOutput]) -> None:
    """One layer through every stage: each reads what the stages before it gave, and reports
    progress within its share of the layer's bar."""
    start, seconds = 0.0, {}
    for stage in stages:
        report(start)
        started = time.time()
        out = stage.run(dataclasses.replace(ctx, progress=part(report, start, start + stage.share)))
        seconds[stage.name] = time.time() - started
        start += stage.share
        ctx.row.update(out.layer_columns.get(ctx.layer, {}))
        ctx.features.update(out.feature_columns.get(ctx.layer, {}))
        outputs[stage.name].extend(out)
    print(_layer_summary(stages, ctx, seconds))


def _layer_summary(stages: list[Stage], ctx: LayerContext, seconds: dict[str, float]) -> str:
    """One line per layer: each stage's figures, then the time each took (against its share)."""
    figures = ", ".join(s.summary(ctx.row, ctx.features) for s in stages if s.summary)
    return f"  layer {ctx.layer}: {figures}; " + ", ".join(f"{name} {t:.1f} s" for name, t in seconds.items())


def run_stages(stages: list[Stage], ctx: RunContext) -> dict[str, Any]:
    """Each analysis once over all layers, its output merged into ctx.tables as it finishes,
    progress shared equally among them. Returns the run_info they give."""
    run_info: dict[str, Any] = {}
    for i, stage in enumerate(stages):
        share = part(ctx.progress, i / len(stages), (i + 1) / len(stages))
        output = stage.run(dataclasses.replace(ctx, progress=share))
        merge(ctx.tables, output, list(ctx.config.layers), stage)
        run_info.update(output.run_info)
        share(1.0)
    return run_info


def merge(tables: dict[str, Columns], output: StageOutput, layers: list[int], stage: Stage) -> None:
    """A stage's columns into the tables, layer by layer in `layers` order; a layer it says
    nothing about gets NULLs."""
    _check_declared(stage, output)
    _add_columns(tables["layers"], {name: [output.layer_columns.get(layer, {}).get(name) for layer in layers]
                                    for name in _names(output.layer_columns)})
    if output.feature_columns:
        n_features = _features_per_layer(tables["features"], layers)
        _add_columns(tables["features"], {name: _feature_values(output, name, layers, n_features)
                                          for name in _names(output.feature_columns)})
    for name, table in output.tables.items():
        if name in tables:
            raise ValueError(f"table {name} comes from two stages")
        tables[name] = table


def _check_declared(stage: Stage, output: StageOutput) -> None:
    """What a stage gives is what it declares: the declarations are what the tests check."""
    given = {"layers": _names(output.layer_columns), "features": _names(output.feature_columns),
             "tables": list(output.tables)}
    declared = {"layers": stage.layer_columns, "features": stage.feature_columns, "tables": stage.tables}
    for kind, names in given.items():
        unknown = [name for name in names if name not in declared[kind]]
        if unknown:
            raise ValueError(f"stage {stage.name} gives {kind} {', '.join(unknown)} it does not declare")


def _feature_values(output: StageOutput, name: str, layers: list[int], n_features: dict[int, int]) -> list:
    values: list = []
    for layer in layers:
        given = output.feature_columns.get(layer, {}).get(name)
        if given is not None and len(given) != n_features[layer]:
            raise ValueError(f"column {name}: {len(given)} values for layer {layer}'s {n_features[layer]} features")
        values.extend([None] * n_features[layer] if given is None else list(given))
    return values


def _names(per_layer: dict[int, dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for columns in per_layer.values() for name in columns))


def _features_per_layer(features: Columns, layers: list[int]) -> dict[int, int]:
    counts = Counter(features["layer"])
    return {layer: counts[layer] for layer in layers}


def _add_columns(table: Columns, columns: Columns) -> None:
    twice = table.keys() & columns.keys()
    if twice:
        raise ValueError(f"columns {', '.join(sorted(twice))} come from two stages")
    length = len(next(iter(table.values()))) if table else 0
    for name, values in columns.items():
        if len(values) != length:
            raise ValueError(f"column {name}: {len(values)} values for {length} rows")
        table[name] = values
