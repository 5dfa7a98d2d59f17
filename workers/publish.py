"""Write one run's DuckDB feature store to a temp file, then rename it into place; and the
run's SQL registry rows, from the same tables.

A killed worker leaves at most a *.tmp file behind, never a half-written store.
No torch here: tests and benchmarks build stores from plain columns too.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa

from backend.core.layer_choice import best_layer
from backend.core.rankings import FALLBACK_RANKING, RANKINGS
from backend.core.store_schema import (CARD_INDEX_SQL, SEARCH_INDEX_SQL, STORE_FILENAME, STORE_VERSION, TABLES,
                                  WRITTEN_TABLES, feature_card_sql, schema_sql)

Columns = Mapping[str, Sequence | object]  # column name -> list / numpy array / pyarrow array


def check_columns(table: str, columns: Columns) -> None:
    """`columns` are exactly the spec's columns of `table` (backend/core/store_schema.py): a column
    left out would be silently NULL, an unknown one silently dropped."""
    expected = TABLES[table].names
    missing = [name for name in expected if name not in columns]
    unknown = [name for name in columns if name not in expected]
    if missing or unknown:
        raise ValueError(f"table {table}: " + "; ".join(
            f"{what} column{'s' if len(names) > 1 else ''} {', '.join(names)}"
            for what, names in (("missing", missing), ("unknown", unknown)) if names))


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: Columns) -> None:
    arrow = pa.table(dict(columns))
    con.register("incoming", arrow)
    names = ", ".join(arrow.column_names)
    con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming")
    con.unregister("incoming")


CARD_SCHEMA = pa.schema([("card_key", pa.int64()), ("card", pa.binary())])


def default_sort(ranking: str | None) -> str:
    """The layer table's default sort: its default ranking's (backend/core/rankings.py)."""
    return RANKINGS[ranking or FALLBACK_RANKING].sort


def _write_cards(con: duckdb.DuckDBPyConnection, chunk: int = 4096) -> None:
    """Each feature's page as one compressed JSON card (backend/core/store_schema.py), built a layer
    and a chunk at a time, so memory stays bounded whatever the store's size. One INSERT reads
    the whole stream: inserting chunk by chunk left small row groups that the final checkpoint
    rewrote, and the file kept the old blocks (5 GB of 14 at 1M features)."""
    layers = [layer for (layer,) in con.execute("SELECT DISTINCT layer FROM features ORDER BY layer").fetchall()]
    defaults = dict(con.execute("SELECT layer, default_ranking FROM layers").fetchall())

    def batches():
        for layer in layers:
            cards = con.cursor()
            cards.execute(feature_card_sql(default_sort(defaults.get(layer))), [layer])
            while rows := cards.fetchmany(chunk):
                # zlib level 1: a third of the JSON's size at ~4x the speed of the default level
                yield pa.record_batch([pa.array([key for key, _ in rows], pa.int64()),
                                       pa.array([zlib.compress(text.encode(), 1) for _, text in rows], pa.binary())],
                                      schema=CARD_SCHEMA)
            cards.close()

    stream = pa.RecordBatchReader.from_batches(CARD_SCHEMA, batches())
    con.register("incoming_cards", stream)
    con.execute("INSERT INTO feature_cards SELECT card_key, card FROM incoming_cards")
    con.unregister("incoming_cards")
    con.execute(CARD_INDEX_SQL)


def write_store(path: Path, run_info: Mapping[str, object], tables: Mapping[str, Columns]) -> Path:
    """Create the store at `path` atomically. `tables` maps table name (of WRITTEN_TABLES) ->
    columns, each table's exactly as the spec has them (ValueError otherwise, and no store)."""
    unknown = [table for table in tables if table not in WRITTEN_TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {', '.join(unknown)}; a store is written from {', '.join(WRITTEN_TABLES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute(schema_sql())
            # a value not known (None) is left out, not written as the string 'None'
            info = {"store_version": STORE_VERSION, **{k: v for k, v in run_info.items() if v is not None}}
            _insert(con, "run_info", {"key": list(info), "value": [str(v) for v in info.values()]})
            for table in WRITTEN_TABLES:
                if table in tables:
                    columns = tables[table]  # read once: a table may be built when asked for
                    check_columns(table, columns)
                    _insert(con, table, columns)
            con.execute(SEARCH_INDEX_SQL)
            _write_cards(con)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.wal").unlink(missing_ok=True)
        raise
    return path


def layer_rows(layers: Columns) -> list[dict[str, Any]]:
    """The layers table's columns as one dict per layer."""
    names = list(layers)
    return [dict(zip(names, values)) for values in zip(*(layers[name] for name in names))]


def with_best_layer(run_info: Mapping[str, Any], layers: Columns) -> dict[str, Any]:
    """run_info plus the layer to open first, chosen here once (backend/core/layer_choice.py): the
    store's run_info and the SQL runs row both take it from this, so the run page and the runs
    list agree."""
    layer = best_layer(layer_rows(layers))
    return {**run_info, "best_layer": None if layer is None else int(layer)}


SAE_WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's name for an SAE's weights


def sae_fingerprint(sae_dir: Path) -> str | None:
    """sha256 of the SAE's weights file, or None where there is none (a synthetic run). A
    label made on another SAE of the layer is recognised by it (backend/core/labels.py)."""
    path = Path(sae_dir) / SAE_WEIGHTS_FILENAME
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def registry_rows(run_info: Mapping[str, Any], layers: Columns, run_dir: Path,
                  data_dir: Path | None = None) -> tuple[dict, list[dict]]:
    """The SQL registry's rows for a run (backend/core/models.py): the runs row, with what the runs
    list shows, and each SAE's identity. `run_info` as written to the store (with_best_layer);
    `run_dir` relative to the data dir (runs/<id>); the layers table's paths are relative to it.
    With `data_dir`, each SAE's fingerprint is read from its weights file there (None without)."""
    rows = layer_rows(layers)
    best = run_info.get("best_layer")
    best_r2 = next((row["r2_heldout"] for row in rows if row["layer"] == best), None)
    run_row = {
        "id": run_info["run_id"], **{key: run_info[key] for key in ("name", "model", "adapter", "dataset", "config_yaml")},
        "store_path": str(Path(run_dir) / STORE_FILENAME),
        "n_texts": int(run_info["n_texts"]), "n_tokens": int(run_info["n_tokens"]),
        "best_layer": best, "best_r2_heldout": None if best_r2 is None else float(best_r2),
    }
    sae_rows = [{"layer": row["layer"], "hook_name": row["hook_name"], "path": str(Path(run_dir) / row["sae_path"]),
                 "architecture": row["architecture"], "d_in": row["d_in"], "d_sae": row["d_sae"],
                 "fingerprint": None if data_dir is None else sae_fingerprint(Path(data_dir) / run_dir / row["sae_path"])}
                for row in rows]
    return run_row, sae_rows
