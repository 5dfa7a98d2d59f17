"""Feature labels (reward-related / not reward-related / unsure) with a note, and their history.

No lost updates: every edit names the version it was made from, and is refused (StaleLabel)
when the label has changed since. The write itself enforces that, in the transaction that
also appends the LabelEvent (so history and label never disagree): a conditional
UPDATE/DELETE (`WHERE version = expected`, rowcount checked) or an INSERT whose primary key
refuses a concurrent insert. The read before it only shapes the event and the message: on
SQLite, pysqlite opens the transaction at the first write, so that read is not isolated.
Clearing a label deletes its row; versions still only grow (the next one follows the last
event's), so a version never names two different states.

Labels outlive a replaced run (db.register_run): each label and event records the run version
and the SAE (its fingerprint) it was made on, and every read says whether that is the layer's
current SAE (`made_on_current_sae`: None where no fingerprint can tell), so a label made on an
earlier SAE is shown for review, never hidden. Saving it again, even unchanged, makes it current.
"""
from __future__ import annotations

import dataclasses
import random
import time
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from backend.core import db, store
from backend.core.models import LABELS, Label, LabelEvent, Run, Sae, utcnow
from backend.core.settings import Settings
from backend.core.store import NotFound

LABEL_NAMES = {"reward": "reward-related", "not_reward": "not reward-related", "unsure": "unsure"}
UNLABELLED = "unlabelled"  # the table filter for features without a label
MAX_NOTE = 2000
EXPORT_COLUMNS = ("run_id", "layer", "feature", "label", "note", "author", "updated_at", "version",
                  "run_version", "sae_fingerprint", "made_on_current_sae",
                  # the feature's current explanation beside its label (backend/explanations.with_explanations)
                  "explanation", "explanation_model", "reward_related")
# db.py sets no busy timeout of its own, so SQLite writers wait sqlite3's default 5 s for the
# lock; a write that still finds the database locked is retried whole (it rolled back: nothing landed).
LOCKED_RETRIES = 8


class InvalidLabel(ValueError):
    """An unknown label value or an over-long note: HTTP 422."""


class StaleLabel(Exception):
    """The label changed since the version the edit was made from: HTTP 409. `current` is
    the label as it is now."""

    def __init__(self, current: dict[str, Any], expected: int):
        self.current = current
        where = f"feature {current['feature']} of layer {current['layer']}"
        if current["version"] < expected:
            message = f"{where} has no version {expected}: its label is at version {current['version']}"
        else:
            now = LABEL_NAMES.get(current["label"], "no label")
            message = (f"{where} was changed by {current['author']} to {now} (version {current['version']}) "
                       f"since you loaded the page (version {expected}); nothing was saved: review it and "
                       "submit again to overwrite")
        super().__init__(message)


class _Lost(Exception):
    """Someone else wrote first (inside the transaction; becomes StaleLabel outside it)."""


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; they were written in UTC
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


_runs, _saes = Run.__table__, Sae.__table__
# the run's version and the layer's SAE now, beside each label row read (no SAE: the layer was dropped)
_NOW_COLUMNS = (_runs.c.version.label("run_version_now"), _saes.c.fingerprint.label("fingerprint_now"),
                _saes.c.id.label("sae_now"))


def _with_now(table: sa.Table) -> sa.Join:
    return table.join(_runs, _runs.c.id == table.c.run_id).outerjoin(
        _saes, (_saes.c.run_id == table.c.run_id) & (_saes.c.layer == table.c.layer))


_NOW = (sa.select(*_NOW_COLUMNS).select_from(_runs.outerjoin(_saes, (_saes.c.run_id == _runs.c.id)
                                                             & (_saes.c.layer == sa.bindparam("layer"))))
        .where(_runs.c.id == sa.bindparam("run_id")))


def _made_on(fingerprint: str | None, run_version: int | None, now: Any) -> dict[str, Any]:
    """Which run version and SAE a label was made on, and whether that SAE is the layer's now
    (`now`: a row of _NOW_COLUMNS). A label older than run versions was made on version 1:
    replacing a run deleted its labels then."""
    version = 1 if run_version is None else run_version
    if now.sae_now is None:
        current = False  # the layer is no longer in the run
    elif version == now.run_version_now:
        current = True
    elif fingerprint and now.fingerprint_now:
        current = fingerprint == now.fingerprint_now
    else:
        current = None  # an SAE without a weights file: nothing tells
    return {"run_version": version, "sae_fingerprint": fingerprint, "made_on_current_sae": current}


_NO_LABEL = {"run_version": None, "sae_fingerprint": None, "made_on_current_sae": None}


def _label_dict(row: Label | sa.Row, now: Any) -> dict[str, Any]:
    return {"run_id": row.run_id, "layer": row.layer, "feature": row.feature, "label": row.label,
            "note": row.note, "author": row.author, "updated_at": _utc(row.updated_at), "version": row.version,
            **_made_on(row.sae_fingerprint, row.run_version, now)}


def _now(s: Session, run_id: str, layer: int, lock: bool = False) -> sa.Row:
    """The run's version and the layer's SAE now; NotFound without the run. `lock`: the run's
    row FOR SHARE (PostgreSQL), so a replace or a deletion of the run waits for this write."""
    query = _NOW.with_for_update(read=True, of=_runs) if lock else _NOW
    now = s.execute(query, {"run_id": run_id, "layer": layer}).first()
    if now is None:
        raise NotFound(f"run {run_id!r} not found")
    return now


def _state(s: Session, run_id: str, layer: int, feature: int, lock: bool = False) -> dict[str, Any]:
    """The label now; without one (never set, or cleared) the last event gives version and author.
    `lock`: hold the row until the transaction ends (PostgreSQL; SQLite has one writer anyway)."""
    key = {"run_id": run_id, "layer": layer, "feature": feature}
    query = sa.select(Label).filter_by(**key)
    row = s.scalars(query.with_for_update() if lock else query).one_or_none()
    if row is not None:
        return _label_dict(row, _now(s, run_id, layer))
    last = s.scalars(sa.select(LabelEvent).filter_by(**key).order_by(LabelEvent.version.desc()).limit(1)).first()
    return {**key, "label": None, "note": "", "author": last.author if last else None,
            "updated_at": _utc(last.created_at) if last else None, "version": last.version if last else 0,
            **_NO_LABEL}


def _run(settings: Settings, run_id: str) -> Run:
    with db.session(settings) as s:
        run = s.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id!r} not found")
    return run


def check_feature(settings: Settings, run_id: str, layer: int, feature: int) -> None:
    """NotFound unless the run's store has this layer and the layer this feature id."""
    run = _run(settings, run_id)
    try:
        info = store.layer_info(settings.data_dir / run.store_path, layer)  # an absolute store_path stays as is
    except NotFound as exc:
        raise NotFound(f"run {run_id!r}: {exc}") from None
    if not 0 <= feature < info["d_sae"]:
        raise NotFound(f"run {run_id!r}: feature {feature} not found in layer {layer}")


def is_orphaned(settings: Settings, run_id: str, layer: int, feature: int) -> bool:
    """Whether the feature has a label although the run's store no longer has it (a replace that
    shrank the layer, or dropped it): such a label is kept, shown on the labels page and clearable."""
    try:
        check_feature(settings, run_id, layer, feature)
    except NotFound:
        _run(settings, run_id)  # an unknown run is a 404, not an orphan
        return current(settings, run_id, layer, feature)["label"] is not None
    return False


def orphaned_rows(settings: Settings, run_id: str, widths: dict[int, int]) -> list[dict[str, Any]]:
    """The run's labels (export_rows), each marked `orphaned` where its layer is gone or narrower
    than its feature id (`widths`: each layer's features now)."""
    rows = export_rows(settings, run_id)
    for row in rows:
        row["orphaned"] = row["layer"] not in widths or row["feature"] >= widths[row["layer"]]
    return rows


def current(settings: Settings, run_id: str, layer: int, feature: int) -> dict[str, Any]:
    """The feature's label (label None when it has none) and the version an edit must name."""
    with db.session(settings) as s:
        return _state(s, run_id, layer, feature)


def set_label(settings: Settings, run_id: str, layer: int, feature: int, label: str | None, note: str | None,
              author: str, expected_version: int) -> dict[str, Any]:
    """Set (or, with label "" / None, clear) a feature's label, if it is still at
    `expected_version` (0: never labelled). Returns the label as it is now."""
    label = label or None
    note = (note or "") if label else ""  # a cleared label has no note
    if label is not None and label not in LABELS:
        raise InvalidLabel(f"unknown label {label!r}; expected one of {', '.join(LABELS)}, or empty to clear it")
    if len(note) > MAX_NOTE:
        raise InvalidLabel(f"the note has {len(note)} characters; at most {MAX_NOTE} are kept")
    try:
        check_feature(settings, run_id, layer, feature)
    except NotFound:  # a label left on a feature the run no longer has (a replace shrank the layer) may be cleared
        if label is not None or not is_orphaned(settings, run_id, layer, feature):
            raise
    for attempt in range(LOCKED_RETRIES):
        try:
            return _write(settings, run_id, layer, feature, label, note, author, expected_version)
        except _Lost:
            raise StaleLabel(current(settings, run_id, layer, feature), expected_version) from None
        except OperationalError as exc:  # "database is locked": SQLite's single writer was busy too long
            if "locked" not in str(exc) or attempt == LOCKED_RETRIES - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05) * 2 ** attempt)
    raise AssertionError("unreachable")


def _write(settings: Settings, run_id: str, layer: int, feature: int, label: str | None, note: str,
           author: str, expected: int) -> dict[str, Any]:
    key = {"run_id": run_id, "layer": layer, "feature": feature}
    with db.session(settings) as s, s.begin():
        sae = _now(s, run_id, layer, lock=True)  # before the label's row: every writer locks in this order
        made_on = {"sae_fingerprint": sae.fingerprint_now, "run_version": sae.run_version_now}
        old = _state(s, run_id, layer, feature, lock=True)
        if old["version"] != expected:
            raise _Lost
        # nothing changes: no new version, no event; but the same label saved again on a later run
        # version is a review, recorded as one
        if (old["label"], old["note"]) == (label, note) and (label is None or old["run_version"] == sae.run_version_now):
            return old
        now, version = utcnow(), expected + 1
        if old["label"] is None:
            s.add(Label(**key, label=label, note=note, version=version, author=author, updated_at=now, **made_on))
            try:
                s.flush()
            except IntegrityError:  # another writer inserted it first
                raise _Lost from None
            # ... or inserted and cleared it between our read and our insert: versions never repeat
            if (s.scalar(sa.select(sa.func.max(LabelEvent.version)).filter_by(**key)) or 0) > expected:
                raise _Lost
        else:
            stmt = (sa.update(Label).values(label=label, note=note, version=version, author=author, updated_at=now,
                                            **made_on)
                    if label else sa.delete(Label))
            if s.execute(stmt.filter_by(**key).where(Label.version == expected)).rowcount != 1:
                raise _Lost
        s.add(LabelEvent(**key, version=version, old_label=old["label"], new_label=label,
                         old_note=old["note"] if old["label"] else None, new_note=note if label else None,
                         author=author, created_at=now, **made_on))
    return {**key, "label": label, "note": note, "author": author, "updated_at": now, "version": version,
            **(_made_on(sae.fingerprint_now, sae.run_version_now, sae) if label else _NO_LABEL)}


_labels = Label.__table__
_LABELS_OF_LAYER = (sa.select(_labels, *_NOW_COLUMNS).select_from(_with_now(_labels))
                    .where(_labels.c.run_id == sa.bindparam("run_id"), _labels.c.layer == sa.bindparam("layer")))
_events = LabelEvent.__table__
_EVENTS_OF_FEATURE = (sa.select(_events, *_NOW_COLUMNS).select_from(_with_now(_events))
                      .where(_events.c.run_id == sa.bindparam("run_id"), _events.c.layer == sa.bindparam("layer"),
                             _events.c.feature == sa.bindparam("feature"))
                      .order_by(_events.c.version, _events.c.id))


def _history(settings: Settings, run_id: str, layer: int, feature: int) -> tuple[list[dict[str, Any]], sa.Row | None]:
    with db.get_engine(settings).connect() as conn:  # Core: a feature page reads this every time
        events = conn.execute(_EVENTS_OF_FEATURE, {"run_id": run_id, "layer": layer, "feature": feature}).all()
    return [{"version": e.version, "old_label": e.old_label, "new_label": e.new_label, "old_note": e.old_note,
             "new_note": e.new_note, "author": e.author, "created_at": _utc(e.created_at),
             "run_version": 1 if e.run_version is None else e.run_version, "sae_fingerprint": e.sae_fingerprint}
            for e in events], events[-1] if events else None


def history(settings: Settings, run_id: str, layer: int, feature: int) -> list[dict[str, Any]]:
    """Every change of the feature's label, oldest first, each with the run version it was made on."""
    return _history(settings, run_id, layer, feature)[0]


def current_and_history(settings: Settings, run_id: str, layer: int, feature: int) -> tuple[dict, list[dict]]:
    """current() and history() from one query: every change writes, in the same transaction, an
    event holding the label as it became (and what it was made on), so the last event is the label now."""
    events, last = _history(settings, run_id, layer, feature)
    key = {"run_id": run_id, "layer": layer, "feature": feature}
    if last is None:
        return {**key, "label": None, "note": "", "author": None, "updated_at": None, "version": 0, **_NO_LABEL}, events
    made_on = _made_on(last.sae_fingerprint, last.run_version, last) if last.new_label else _NO_LABEL
    return {**key, "label": last.new_label, "note": last.new_note or "", "author": last.author,
            "updated_at": _utc(last.created_at), "version": last.version, **made_on}, events


def labels_for_layer(settings: Settings, run_id: str, layer: int) -> dict[int, dict[str, Any]]:
    """The layer's labelled features: feature id -> its label."""
    with db.get_engine(settings).connect() as conn:  # Core: every table page reads this
        rows = conn.execute(_LABELS_OF_LAYER, {"run_id": run_id, "layer": layer}).all()
    return {row.feature: _label_dict(row, row) for row in rows}


def restrict(where: store.FeatureFilter, label: str | None, labelled: dict[int, dict[str, Any]],
             n_features: int) -> store.FeatureFilter:
    """`where` narrowed to the features with `label` (UNLABELLED: those without one). Labels
    live in SQL and the table in DuckDB, so the ids cross over as a list."""
    if not label:
        return where
    if label == UNLABELLED:
        ids = set(range(n_features)) - labelled.keys()
    else:
        ids = {feature for feature, row in labelled.items() if row["label"] == label}
    return dataclasses.replace(where, features=tuple(sorted(ids)))


def export_rows(settings: Settings, run_id: str) -> list[dict[str, Any]]:
    """Every current label of a run, by layer and feature, with plain (string) timestamps: those
    made on an earlier SAE, or on a feature or layer the run no longer has, too."""
    _run(settings, run_id)
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(sa.select(_labels, *_NOW_COLUMNS).select_from(_with_now(_labels))
                            .where(_labels.c.run_id == run_id).order_by(_labels.c.layer, _labels.c.feature)).all()
    return [{**_label_dict(row, row), "updated_at": _utc(row.updated_at).isoformat()} for row in rows]
