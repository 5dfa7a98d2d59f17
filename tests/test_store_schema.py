"""The store's columns are defined once (backend/core/store_schema.py): the DDL, the writer's check,
the reader's columns, the sorts and the feature card all follow from the spec."""
from __future__ import annotations

import json
import subprocess
import sys

import duckdb
import pytest

from backend.core import store, store_schema
from backend.core.layer_choice import best_layer
from backend.web.feature_table import TAB_LABELS
from backend.web.routes.layers import COLUMN_NAMES
from backend.core.store_schema import FEATURES, STORE_FILENAME, TABLES, schema_sql
from tests.helpers import REPO_ROOT, synthetic_tables
from workers.publish import write_store


def test_the_ddl_creates_every_table_of_the_spec():
    con = duckdb.connect()
    con.execute(schema_sql())
    for table in TABLES.values():
        described = con.execute(f"DESCRIBE {table.name}").fetchall()
        assert [name for name, *_ in described] == list(table.names)
        key = {name for name, _, _, pk, *_ in described if pk == "PRI"}
        assert key == set(table.primary_key)


def test_reader_columns_sorts_and_card_fields_come_from_the_spec():
    assert store.LAYER_COLUMNS.split(", ") == list(TABLES["layers"].names)
    assert store.FEATURE_COLUMNS.split(", ") == [c.name for c in FEATURES.columns if c.table]
    sortable = {c.sort_key: c for c in FEATURES.columns if c.sort_key}
    assert store.SORT_COLUMNS["correlation"] == "reward_correlation"
    assert store.SORT_COLUMNS["abs_weight"] == "abs(weight)"
    assert set(store.SORT_COLUMNS) == set(sortable) | {f"abs_{k}" for k, c in sortable.items() if c.abs_label}
    assert set(COLUMN_NAMES) == set(store.SORT_COLUMNS) and COLUMN_NAMES["abs_std_weight"] == "|std. weight|"
    assert set(TAB_LABELS) <= set(store.SORTS)  # the tabs name sorts the spec has
    card_sql = store_schema.feature_card_sql()
    for column in FEATURES.columns:
        assert (f"{column.name} := f.{column.name}" in card_sql) == column.card


@pytest.mark.parametrize("table, change, message", [
    ("features", lambda cols: cols.pop("reward_effect"), "table features: missing column reward_effect"),
    ("layers", lambda cols: cols.update(surprise=[1, 2]), "table layers: unknown column surprise"),
])
def test_write_store_refuses_columns_the_spec_does_not_have(tmp_path, table, change, message):
    tables = synthetic_tables()
    change(tables[table])
    path = tmp_path / STORE_FILENAME
    with pytest.raises(ValueError, match=message):
        write_store(path, {"run_id": "x"}, tables)
    assert list(tmp_path.iterdir()) == []  # no store, no temp file


def test_write_store_refuses_an_unknown_table(tmp_path):
    with pytest.raises(ValueError, match="unknown table.*feature_stats"):
        write_store(tmp_path / STORE_FILENAME, {"run_id": "x"}, {"feature_stats": {}})


# In a fresh interpreter: the spec is patched before anything reads it, as an edit of
# store_schema.py would be; nothing else is touched.
NEW_COLUMN_SCRIPT = """
import dataclasses, json, sys
from pathlib import Path

from backend.core import store_schema as schema

novelty = schema.Column("novelty", "DOUBLE", "a column added to the spec alone", table=True,
                        sort_key="novelty", label="novelty")
schema.FEATURES = dataclasses.replace(schema.FEATURES, columns=(*schema.FEATURES.columns, novelty))
schema.TABLES["features"] = schema.FEATURES

from backend.core import store
from backend.web.routes.layers import describe_sort
from tests.helpers import synthetic_tables
from workers.publish import write_store

path = write_store(Path(sys.argv[1]), {"run_id": "x"}, synthetic_tables())
row = store.features(path, 5, sort="novelty", limit=1).rows[0]
print(json.dumps({"row": row, "card": store.feature(path, 5, row["feature"])["novelty"],
                  "label": describe_sort("-novelty")}))
"""


def test_a_feature_column_added_to_the_spec_reaches_store_table_rows_and_card(tmp_path):
    path = tmp_path / STORE_FILENAME
    out = subprocess.run([sys.executable, "-c", NEW_COLUMN_SCRIPT, str(path)], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.splitlines()[-1])
    # the helper's synthetic DOUBLE: row i / 8; layer 5's features are rows 64..127
    assert got["row"]["feature"] == 63 and got["row"]["novelty"] == 127 / 8
    assert got["card"] == 127 / 8
    assert got["label"] == "novelty, smallest first"
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT data_type FROM information_schema.columns "
                       "WHERE table_name = 'features' AND column_name = 'novelty'").fetchone() == ("DOUBLE",)


def test_runs_list_and_run_page_report_the_one_best_layer(client, migrated, synthetic_run):
    path = migrated.run_dir("synthetic") / STORE_FILENAME
    chosen = best_layer(store.layers(path))
    listed = client.get("/api/runs").json()["runs"][0]
    page = client.get("/api/runs/synthetic").json()
    assert listed["best_layer"] == page["best_layer"] == store.best_layer(path) == chosen
    best_row = next(l for l in page["layers"] if l["layer"] == chosen)
    assert listed["best_r2_heldout"] == pytest.approx(best_row["r2_heldout"])
