"""A run's labels with what they label: every feature that has, or had, a label, with the label as
it is now (none where it was cleared), the feature's statistics from the store (none where the run
no longer has the feature: `orphaned`), its place in its layer's default ranking, and every change
of its label (who, when, old → new, on which run version and SAE)."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson
import sqlalchemy as sa

from backend.core import db, labels, store
from backend.core.exports.source import LayerSource, reading, run_and_store, safe_name
from backend.core.exports.streams import spreadsheet_safe
from backend.core.exports.tables import default_ranks
from backend.core.models import LabelEvent
from backend.core.settings import Settings

STAT_COLUMNS = ("top_token", "frequency", "mean_activation", "max_activation", "weight", "weight_se", "reward_effect",
                "attribution", "measured_delta", "measured_delta_low", "measured_delta_high", "measured_n",
                "reward_correlation")
LABEL_COLUMNS = (*labels.EXPORT_COLUMNS, "orphaned")
CSV_COLUMNS = (*LABEL_COLUMNS, *STAT_COLUMNS, "default_ranking", "default_rank", "n_changes", "history")
FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json"}
HISTORY_FIELDS = ("version", "old_label", "new_label", "old_note", "new_note", "author", "created_at", "run_version",
                  "sae_fingerprint")


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    return value


def _histories(settings: Settings, run_id: str) -> dict[tuple[int, int], list[dict[str, Any]]]:
    """Every label event of the run, oldest first, by (layer, feature)."""
    events = LabelEvent.__table__
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(sa.select(events).where(events.c.run_id == run_id)
                            .order_by(events.c.layer, events.c.feature, events.c.version, events.c.id)).all()
    out: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for e in rows:
        out[(e.layer, e.feature)].append({name: _iso(getattr(e, name)) for name in HISTORY_FIELDS})
    return out


def _stats(con, path, layer: int, features: list[int]) -> tuple[dict[int, dict[str, Any]], str | None, dict[int, int]]:
    try:
        info = store.layer_info(path, layer)
    except store.NotFound:  # the layer is gone from the run: its labels are orphaned
        return {}, None, {}
    rows = con.execute(f"SELECT feature, {', '.join(STAT_COLUMNS)} FROM features WHERE layer = ? AND feature IN "
                       "(SELECT unnest(?::INTEGER[]))", [layer, features]).fetchall()
    names = ("feature", *STAT_COLUMNS)
    stats = {int(r[0]): dict(zip(names, r)) for r in rows}
    ranking, ranks = default_ranks(con, LayerSource(None, path, path.parent, info))
    return stats, ranking, ranks


def records(settings: Settings, run_id: str) -> Iterator[dict[str, Any]]:
    """One record per feature with a label or a label history, by layer and feature."""
    _, path = run_and_store(settings, run_id)
    current = {(r["layer"], r["feature"]): r for r in labels.export_rows(settings, run_id)}
    histories = _histories(settings, run_id)
    keys = sorted(set(current) | set(histories))
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, feature in keys:
        by_layer[layer].append(feature)
    with reading(path) as con:
        for layer, features in by_layer.items():
            stats, ranking, ranks = _stats(con, path, layer, features)
            for feature in features:
                label = current.get((layer, feature)) or {"run_id": run_id, "layer": layer, "feature": feature}
                mine = stats.get(feature)
                yield {**{name: _iso(label.get(name)) for name in labels.EXPORT_COLUMNS}, "orphaned": mine is None,
                       **{name: (mine or {}).get(name) for name in STAT_COLUMNS},
                       "default_ranking": ranking if mine else None, "default_rank": ranks.get(feature),
                       "history": histories.get((layer, feature), [])}


def filename(run_id: str) -> str:
    return f"labels-with-stats-{safe_name(run_id)}"


def json_stream(settings: Settings, run_id: str) -> Iterator[bytes]:
    """{"run_id", "exported_at", "labels": [...]}, a label at a time."""
    head = {"run_id": run_id, "exported_at": datetime.now(timezone.utc).isoformat()}
    yield orjson.dumps(head)[:-1] + b',"labels":['
    for i, record in enumerate(records(settings, run_id)):
        yield (b"," if i else b"") + orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
    yield b"]}"


def csv_stream(settings: Settings, run_id: str) -> Iterator[bytes]:
    """One row per labelled feature; its history as JSON in the last column."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    yield out.getvalue().encode()
    for record in records(settings, run_id):
        out.seek(0)
        out.truncate()
        row = {**record, "n_changes": len(record["history"]), "history": orjson.dumps(record["history"]).decode()}
        writer.writerow([spreadsheet_safe(row[name]) for name in CSV_COLUMNS])
        yield out.getvalue().encode()


def stream(settings: Settings, run_id: str, fmt: str) -> Iterator[bytes]:
    store.run_info(run_and_store(settings, run_id)[1])  # an unknown run or old store: refused before the first byte
    return csv_stream(settings, run_id) if fmt == "csv" else json_stream(settings, run_id)
