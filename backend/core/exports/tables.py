"""A layer's feature table as the layer page filters and sorts it, every statistic the store keeps
for a feature (its scalar columns), each feature's label and its place in the default ranking: as
CSV or Parquet, written chunk by chunk."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backend.core import labels, store
from backend.core.exports.source import LayerSource, open_layer, reading, safe_name
from backend.core.exports.streams import ChunkSink, spreadsheet_safe
from backend.core.rankings import RANKINGS, FALLBACK_RANKING
from backend.core.settings import Settings
from backend.core.store_schema import FEATURES, order_sql

CHUNK_ROWS = 4096
# every per-feature number and string of the store; its lists (histogram, top tokens, neighbours) are
# on the feature's page and in the Neuronpedia export
STAT_COLUMNS = tuple(c.name for c in FEATURES.columns if "[]" not in c.sql_type and not c.sql_type.startswith("STRUCT"))
LABEL_COLUMNS = ("label", "label_note", "label_author", "label_version", "label_made_on_current_sae")
EXTRA_COLUMNS = ("view_rank", "default_ranking", "default_rank")
COLUMNS = (*STAT_COLUMNS, *EXTRA_COLUMNS, *LABEL_COLUMNS)
FORMATS = {"csv": "text/csv; charset=utf-8", "parquet": "application/vnd.apache.parquet"}


@dataclass
class TableExport:
    source: LayerSource
    sort: str
    ids: np.ndarray  # the view's features, in its order
    labelled: dict[int, dict[str, Any]]
    view: dict[str, Any]  # the filters and sort, as the layer page's query string has them

    @property
    def filename(self) -> str:
        return f"features-{safe_name(self.source.run_id)}-layer{self.source.layer}"

    def metadata(self) -> dict[str, Any]:
        """What the file is: run, layer, view, and the layer's metrics (Parquet key-value metadata)."""
        info = {k: v for k, v in self.source.info.items() if not isinstance(v, (list, dict))}
        return {"run_id": self.source.run_id, "layer": self.source.layer, "sort": self.sort, "view": self.view,
                "n_features": int(len(self.ids)), "layer_metrics": info}


def table_export(settings: Settings, run_id: str, layer: int, view) -> TableExport:
    """The features a layer-page view (backend.web.routes.common.TableView) lists, in its order."""
    source = open_layer(settings, run_id, layer)
    sort = view.sorted_by(source.info)
    labelled = labels.labels_for_layer(settings, run_id, layer)
    where = labels.restrict(view.filter_for(source.info), view.label, labelled, int(source.info["d_sae"]))
    ids = store.view_order(source.store_path, layer, sort, where)
    return TableExport(source, sort, ids, labelled, view.model_dump(exclude={"page"}, exclude_none=True))


def default_ranks(con, source: LayerSource) -> tuple[str, dict[int, int]]:
    """The layer's default ranking and each live feature's 1-based place in it (features the
    ranking has no value for are left out)."""
    ranking = RANKINGS.get(source.info.get("default_ranking") or FALLBACK_RANKING) or RANKINGS[FALLBACK_RANKING]
    rows = con.execute(f"SELECT feature FROM features WHERE layer = ? AND frequency > 0 AND {ranking.column} "
                       f"IS NOT NULL ORDER BY {order_sql(ranking.sort)}", [source.layer]).fetchall()
    return ranking.key, {int(f): i + 1 for i, (f,) in enumerate(rows)}


def _chunks(export: TableExport) -> Iterator[pa.Table]:
    """The view's rows, CHUNK_ROWS at a time, in its order, with every column of COLUMNS."""
    with reading(export.source.store_path) as con:
        ranking, ranks = default_ranks(con, export.source)
        for start in range(0, len(export.ids), CHUNK_ROWS):
            ids = [int(i) for i in export.ids[start:start + CHUNK_ROWS]]
            table = con.sql(f"SELECT {', '.join(STAT_COLUMNS)} FROM features WHERE layer = ? AND feature IN "
                            "(SELECT unnest(?::INTEGER[]))", params=[export.source.layer, ids]).to_arrow_table()
            order = {f: i for i, f in enumerate(table.column("feature").to_pylist())}
            table = table.take(pa.array([order[f] for f in ids]))
            mine = [export.labelled.get(f) or {} for f in ids]
            extra = {
                "view_rank": pa.array(range(start + 1, start + 1 + len(ids)), pa.int64()),
                "default_ranking": pa.array([ranking] * len(ids), pa.string()),
                "default_rank": pa.array([ranks.get(f) for f in ids], pa.int64()),
                "label": pa.array([m.get("label") for m in mine], pa.string()),
                "label_note": pa.array([m.get("note") for m in mine], pa.string()),
                "label_author": pa.array([m.get("author") for m in mine], pa.string()),
                "label_version": pa.array([m.get("version") for m in mine], pa.int64()),
                "label_made_on_current_sae": pa.array([m.get("made_on_current_sae") for m in mine], pa.bool_()),
            }
            for name, column in extra.items():
                table = table.append_column(name, column)
            yield table


def csv_stream(export: TableExport) -> Iterator[bytes]:
    """The table as CSV (a header row first), a chunk of rows at a time."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for table in _chunks(export):
        for row in table.to_pylist():
            writer.writerow([spreadsheet_safe(row[name]) for name in COLUMNS])
        yield out.getvalue().encode()
        out.seek(0)
        out.truncate()
    if out.tell():  # no rows: the header alone
        yield out.getvalue().encode()


def parquet_stream(export: TableExport) -> Iterator[bytes]:
    """The table as Parquet, one row group per chunk, with what it is in the file's metadata
    (key `rewardatlas`, JSON)."""
    sink = ChunkSink()
    writer = None
    for table in _chunks(export):
        if writer is None:
            schema = table.schema.with_metadata({"rewardatlas": json.dumps(export.metadata(), default=str)})
            writer = pq.ParquetWriter(sink, schema)
        writer.write_table(table.cast(writer.schema))
        yield sink.drain()
    if writer is None:  # nothing listed: an empty file with the columns still says what they are
        empty = _empty_table().replace_schema_metadata({"rewardatlas": json.dumps(export.metadata(), default=str)})
        writer = pq.ParquetWriter(sink, empty.schema)
        writer.write_table(empty)
    writer.close()
    yield sink.drain()


def _empty_table() -> pa.Table:
    types = {"INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(), "FLOAT": pa.float32(),
             "VARCHAR": pa.string(), "BOOLEAN": pa.bool_()}
    fields = [pa.field(c.name, types.get(c.sql_type.split()[0], pa.string())) for c in FEATURES.columns
              if c.name in STAT_COLUMNS]
    fields += [pa.field("view_rank", pa.int64()), pa.field("default_ranking", pa.string()),
               pa.field("default_rank", pa.int64()), pa.field("label", pa.string()), pa.field("label_note", pa.string()),
               pa.field("label_author", pa.string()), pa.field("label_version", pa.int64()),
               pa.field("label_made_on_current_sae", pa.bool_())]
    return pa.schema(fields).empty_table()


def stream(export: TableExport, fmt: str) -> Iterator[bytes]:
    return csv_stream(export) if fmt == "csv" else parquet_stream(export)
