"""The stages' merge (workers/stages.py): a stage's columns land in the right layer's rows, a
layer it says nothing about gets NULLs, and a column or table given twice, or one the stage did
not declare, is an error."""
from __future__ import annotations

import pytest

from workers.stages import Stage, StageOutput, merge

STAGE = Stage("test", lambda ctx: StageOutput(), sections=(), layer_columns=("mmcs", "layer"),
              feature_columns=("max_cosine", "layer", "x"), tables=("divergence", "lexicon"))


def tables() -> dict:
    return {"layers": {"layer": [1, 3]}, "features": {"layer": [1, 1, 3, 3, 3], "feature": [0, 1, 0, 1, 2]}}


def test_columns_go_to_their_layer_s_rows():
    t = tables()
    merge(t, StageOutput(layer_columns={3: {"mmcs": 0.8}, 1: {"mmcs": 0.5}},
                         feature_columns={3: {"max_cosine": [0.1, 0.2, 0.3]}},
                         tables={"divergence": {"block": [0]}}), [1, 3], STAGE)
    assert t["layers"]["mmcs"] == [0.5, 0.8]
    assert t["features"]["max_cosine"] == [None, None, 0.1, 0.2, 0.3]
    assert t["divergence"] == {"block": [0]}


def test_a_column_or_table_twice_is_an_error():
    t = tables()
    merge(t, StageOutput(layer_columns={1: {"mmcs": 0.5}}), [1, 3], STAGE)
    with pytest.raises(ValueError, match="mmcs come from two stages"):
        merge(t, StageOutput(layer_columns={3: {"mmcs": 0.1}}), [1, 3], STAGE)
    with pytest.raises(ValueError, match="layer come from two stages"):
        merge(t, StageOutput(feature_columns={1: {"layer": [9, 9]}}), [1, 3], STAGE)
    merge(t, StageOutput(tables={"lexicon": {}}), [1, 3], STAGE)
    with pytest.raises(ValueError, match="table lexicon comes from two stages"):
        merge(t, StageOutput(tables={"lexicon": {}}), [1, 3], STAGE)
    with pytest.raises(ValueError, match="3 values for layer 1's 2 features"):
        merge(t, StageOutput(feature_columns={1: {"x": [1, 2, 3]}}), [1, 3], STAGE)


def test_what_a_stage_does_not_declare_is_an_error():
    for output, words in ((StageOutput(layer_columns={1: {"r2": 0.5}}), "layers r2"),
                          (StageOutput(feature_columns={1: {"weight": [0, 0]}}), "features weight"),
                          (StageOutput(tables={"texts": {}}), "tables texts")):
        with pytest.raises(ValueError, match=f"stage test gives {words} it does not declare"):
            merge(tables(), output, [1, 3], STAGE)


def test_a_per_layer_stage_s_tables_follow_layer_order():
    combined = StageOutput()
    combined.extend(StageOutput({1: {"mmcs": 0.5}}, tables={"divergence": {"block": [0, 1]}}))
    combined.extend(StageOutput({3: {"mmcs": 0.8}}, tables={"divergence": {"block": [2]}}))
    t = tables()
    merge(t, combined, [1, 3], STAGE)
    assert t["layers"]["mmcs"] == [0.5, 0.8] and t["divergence"] == {"block": [0, 1, 2]}
