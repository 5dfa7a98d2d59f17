"""The analyses hook (workers/analyses): an analysis's columns land in the right layer's rows,
a layer it says nothing about gets NULLs, and a column or table given twice is an error."""
from __future__ import annotations

import pytest

from workers.analyses import AnalysisOutput, merge


def tables() -> dict:
    return {"layers": {"layer": [1, 3]}, "features": {"layer": [1, 1, 3, 3, 3], "feature": [0, 1, 0, 1, 2]}}


def test_columns_go_to_their_layer_s_rows():
    t = tables()
    merge(t, AnalysisOutput(layer_columns={3: {"mmcs": 0.8}, 1: {"mmcs": 0.5}},
                            feature_columns={3: {"max_cosine": [0.1, 0.2, 0.3]}},
                            tables={"divergence": {"block": [0]}}), [1, 3])
    assert t["layers"]["mmcs"] == [0.5, 0.8]
    assert t["features"]["max_cosine"] == [None, None, 0.1, 0.2, 0.3]
    assert t["divergence"] == {"block": [0]}


def test_a_column_or_table_twice_is_an_error():
    t = tables()
    merge(t, AnalysisOutput(layer_columns={1: {"mmcs": 0.5}}), [1, 3])
    with pytest.raises(ValueError, match="mmcs come from two stages"):
        merge(t, AnalysisOutput(layer_columns={3: {"mmcs": 0.1}}), [1, 3])
    with pytest.raises(ValueError, match="layer come from two stages"):
        merge(t, AnalysisOutput(feature_columns={1: {"layer": [9, 9]}}), [1, 3])
    merge(t, AnalysisOutput(tables={"lexicon": {}}), [1, 3])
    with pytest.raises(ValueError, match="table lexicon comes from two analyses"):
        merge(t, AnalysisOutput(tables={"lexicon": {}}), [1, 3])
    with pytest.raises(ValueError, match="3 values for layer 1's 2 features"):
        merge(t, AnalysisOutput(feature_columns={1: {"x": [1, 2, 3]}}), [1, 3])
