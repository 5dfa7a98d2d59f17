"""Write one run's DuckDB feature store to a temp file, then rename it into place.

A killed worker leaves at most a *.tmp file behind, never a half-written store.
No torch here: tests and benchmarks build stores from plain columns too.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import duckdb
import pyarrow as pa

from backend.store_schema import CARD_INDEX_SQL, FEATURE_CARD_SQL, SCHEMA, SEARCH_INDEX_SQL, STORE_VERSION

Columns = Mapping[str, Sequence | object]  # column name -> list / numpy array / pyarrow array

TABLE_ORDER = ("texts", "reward_reads", "layers", "features", "contexts")


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: Columns) -> None:
    arrow = pa.table(dict(columns))
    con.register("incoming", arrow)
    names = ", ".join(arrow.column_names)
    con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming")
    con.unregister("incoming")


CARD_SCHEMA = pa.schema([("card_key", pa.int64()), ("card", pa.binary())])


def _write_cards(con: duckdb.DuckDBPyConnection, chunk: int = 4096) -> None:
    """Each feature's page as one compressed JSON card (backend/store_schema.py), built a layer
    and a chunk at a time, so memory stays bounded whatever the store's size. One INSERT reads
    the whole stream: inserting chunk by chunk left small row groups that the final checkpoint
    rewrote, and the file kept the old blocks (5 GB of 14 at 1M features)."""
    layers = [layer for (layer,) in con.execute("SELECT DISTINCT layer FROM features ORDER BY layer").fetchall()]

    def batches():
        for layer in layers:
            cards = con.cursor()
            cards.execute(FEATURE_CARD_SQL, [layer])
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
    """Create the store at `path` atomically. `tables` maps table name -> columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        con = duckdb.connect(str(tmp))
        try:
            con.execute(SCHEMA)
            info = {"store_version": STORE_VERSION, **run_info}
            _insert(con, "run_info", {"key": list(info), "value": [str(v) for v in info.values()]})
            for table in TABLE_ORDER:
                if table in tables:
                    _insert(con, table, tables[table])
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
