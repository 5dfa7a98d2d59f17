"""Feature explanations in the SQL database: versions, classification, scores, search, agreement.

A feature's explanation is a list of versions (models.Explanation); the highest is current. An
explain job or a person writes a new version; classifying and scoring annotate the current one,
so a classification or a score always belongs to the text it was made on. Rows outlive a replaced
run (the run row is updated in place) and say, as labels do, whether the SAE they were made on is
the layer's SAE now.
"""
from __future__ import annotations

import dataclasses
from datetime import timezone
from typing import Any

import numpy as np
import sqlalchemy as sa

from backend.core import db, embedding
from backend.core.labels import _NOW, _NOW_COLUMNS, _made_on, _with_now
from backend.core.models import REWARD_RELATED, Explanation, utcnow
from backend.core.settings import Settings
from backend.core.store import NotFound

MAX_TEXT = 1000  # characters an explanation keeps
EXPLAINER_NAMES = {"llm": "LLM", "offline": "offline (top tokens + n-grams)", "human": "written by hand"}
EXPORT_COLUMNS = ("run_id", "layer", "feature", "version", "text", "evidence", "explainer", "model", "prompt_version",
                  "tokens", "reward_related", "reason", "classified_by", "scored_by", "detection", "fuzzing",
                  "embedding_auc", "causal", "author", "updated_at", "run_version", "made_on_current_sae")

_table = Explanation.__table__
_SHOWN = [c for c in _table.c if c.name not in ("embedding", "evidence_embedding")]


class StaleExplanation(Exception):
    """An edit made from an older version than the current one: HTTP 409."""


def _current_versions(run_id: str, layer: int | None = None):
    """(layer, feature, max version) of the run's explanations: which rows are current."""
    query = (sa.select(_table.c.layer, _table.c.feature, sa.func.max(_table.c.version).label("v"))
             .where(_table.c.run_id == run_id).group_by(_table.c.layer, _table.c.feature))
    if layer is not None:
        query = query.where(_table.c.layer == layer)
    return query.subquery()


def _current_query(run_id: str, layer: int | None = None, columns=None):
    latest = _current_versions(run_id, layer)
    return (sa.select(*(columns or _SHOWN), *_NOW_COLUMNS).select_from(
        _with_now(_table).join(latest, (latest.c.layer == _table.c.layer) & (latest.c.feature == _table.c.feature)
                               & (latest.c.v == _table.c.version)))
            .where(_table.c.run_id == run_id))


def _as_dict(row) -> dict[str, Any]:
    out = {c.name: getattr(row, c.name) for c in _SHOWN}
    for key in ("created_at", "updated_at"):
        if out[key] is not None and out[key].tzinfo is None:
            out[key] = out[key].replace(tzinfo=timezone.utc)
    out.update(_made_on(row.sae_fingerprint, row.run_version, row))
    out["explainer_name"] = EXPLAINER_NAMES.get(out["explainer"], out["explainer"])
    return out


def for_layer(settings: Settings, run_id: str, layer: int) -> dict[int, dict[str, Any]]:
    """The layer's current explanations by feature id."""
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(_current_query(run_id, layer).where(_table.c.layer == layer)).all()
    return {row.feature: _as_dict(row) for row in rows}


def current(settings: Settings, run_id: str, layer: int, feature: int) -> dict[str, Any] | None:
    return for_features(settings, run_id, layer, [feature]).get(feature)


def for_features(settings: Settings, run_id: str, layer: int, features: list[int]) -> dict[int, dict[str, Any]]:
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(_current_query(run_id, layer).where(_table.c.layer == layer,
                                                                 _table.c.feature.in_(features))).all()
    return {row.feature: _as_dict(row) for row in rows}


def history(settings: Settings, run_id: str, layer: int, feature: int) -> list[dict[str, Any]]:
    """Every version of the feature's explanation, newest first."""
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(sa.select(*_SHOWN, *_NOW_COLUMNS).select_from(_with_now(_table))
                            .where(_table.c.run_id == run_id, _table.c.layer == layer, _table.c.feature == feature)
                            .order_by(_table.c.version.desc())).all()
    return [_as_dict(row) for row in rows]


def evidence_text(top_tokens: list[str]) -> str | None:
    """What an explanation was written from, as searched: the feature's top tokens."""
    words = [w for w in dict.fromkeys(" ".join(t.replace("##", "").split()) for t in top_tokens) if w]
    return "fires on " + ", ".join(f"'{w}'" for w in words) if words else None


def _vector_bytes(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, "<f4").tobytes()


def write(settings: Settings, run_id: str, layer: int, feature: int, text: str, *, explainer: str, model: str,
          prompt_version: str, tokens: int, embedding: np.ndarray | None, author: str, job_id: int | None = None,
          expected_version: int | None = None, evidence: str | None = None,
          evidence_embedding: np.ndarray | None = None) -> dict[str, Any]:
    """A new version of the feature's explanation. `expected_version` (a person's edit): refused
    with StaleExplanation when the current version is another. Without `evidence` (a person's
    edit), the version before's is kept."""
    text = " ".join(text.split())[:MAX_TEXT]
    with db.session(settings) as s, s.begin():
        now_row = s.execute(_NOW, {"run_id": run_id, "layer": layer}).first()
        if now_row is None:
            raise NotFound(f"run {run_id!r} not found")
        last = s.scalar(sa.select(sa.func.max(Explanation.version)).where(
            Explanation.run_id == run_id, Explanation.layer == layer, Explanation.feature == feature)) or 0
        if expected_version is not None and expected_version != last:
            raise StaleExplanation(f"feature {feature} of layer {layer} has explanation version {last} now, not "
                                   f"{expected_version}: reload it; nothing was saved")
        found = _vector_bytes(evidence_embedding)
        if evidence is None and last:
            evidence, found = s.execute(sa.select(Explanation.evidence, Explanation.evidence_embedding).where(
                Explanation.run_id == run_id, Explanation.layer == layer, Explanation.feature == feature,
                Explanation.version == last)).one()
        stamp = utcnow()
        row = Explanation(run_id=run_id, layer=layer, feature=feature, version=last + 1, text=text,
                          explainer=explainer, model=model[:200], prompt_version=prompt_version, tokens=int(tokens),
                          embedding=_vector_bytes(embedding), evidence=evidence, evidence_embedding=found,
                          job_id=job_id, author=author, created_at=stamp, updated_at=stamp,
                          sae_fingerprint=now_row.fingerprint_now, run_version=now_row.run_version_now)
        s.add(row)
        s.flush()
        explanation_id = row.id
    return {"id": explanation_id, "version": last + 1, "text": text}


def classify(settings: Settings, explanation_id: int, reward_related: str, reason: str, classified_by: str,
             tokens: int) -> None:
    if reward_related not in REWARD_RELATED:
        raise ValueError(f"reward_related must be one of {REWARD_RELATED}, not {reward_related!r}")
    with db.session(settings) as s, s.begin():
        s.execute(sa.update(Explanation).where(Explanation.id == explanation_id).values(
            reward_related=reward_related, reason=" ".join(reason.split())[:MAX_TEXT], classified_by=classified_by,
            classify_tokens=int(tokens), updated_at=utcnow()))


def set_evidence(settings: Settings, explanation_id: int, evidence: str, evidence_embedding: np.ndarray) -> None:
    """Evidence for an explanation written before explanations kept theirs."""
    with db.session(settings) as s, s.begin():
        s.execute(sa.update(Explanation).where(Explanation.id == explanation_id, Explanation.evidence.is_(None))
                  .values(evidence=evidence, evidence_embedding=_vector_bytes(evidence_embedding)))


def set_scores(settings: Settings, explanation_id: int, scores: dict[str, Any], scored_by: str) -> None:
    with db.session(settings) as s, s.begin():
        s.execute(sa.update(Explanation).where(Explanation.id == explanation_id).values(
            scores=scores, scored_by=scored_by, updated_at=utcnow()))


def restrict(where, contains: str | None, explained: dict[int, dict[str, Any]]):
    """`where` (a store.FeatureFilter) narrowed to the features whose current explanation contains
    `contains` (case-blind); as it is without one. Explanations live in SQL, the table in DuckDB."""
    if not contains:
        return where
    needle = " ".join(contains.split()).lower()
    ids = {f for f, row in explained.items() if needle in row["text"].lower()}
    if where.features is not None:
        ids &= set(where.features)
    return dataclasses.replace(where, features=tuple(sorted(ids)))


def search(settings: Settings, run_id: str, query: str, mode: str = "semantic", layer: int | None = None,
           limit: int = 50) -> list[dict[str, Any]]:
    """The run's current explanations best matching `query`, each with `matched_on`: the
    explanation or its evidence (the top tokens it was written from), whichever matches better.
    Semantic: by MiniLM cosine similarity (`similarity`); text: those containing it (similarity None)."""
    with db.get_engine(settings).connect() as conn:
        q = _current_query(run_id, layer, [*_SHOWN, _table.c.embedding, _table.c.evidence_embedding])
        if layer is not None:
            q = q.where(_table.c.layer == layer)
        rows = conn.execute(q).all()
    if mode == "text":
        needle = query.strip().lower()
        found = [(None, "explanation" if needle in row.text.lower() else "evidence", row) for row in rows
                 if needle in row.text.lower() or needle in (row.evidence or "").lower()]
    else:
        rows = [row for row in rows if row.embedding]
        if not rows:
            return []
        q_vector = embedding.embed([query])[0]
        by_text = np.stack([embedding.from_bytes(row.embedding) for row in rows]) @ q_vector
        by_evidence = np.array([float(embedding.from_bytes(row.evidence_embedding) @ q_vector)
                                if row.evidence_embedding else -np.inf for row in rows])
        sims = np.maximum(by_text, by_evidence)
        order = np.argsort(-sims, kind="stable")
        found = [(float(sims[i]), "evidence" if by_evidence[i] > by_text[i] else "explanation", rows[i])
                 for i in order]
    return [{**_as_dict(row), "similarity": sim, "matched_on": on} for sim, on, row in found[:limit]]


def export_rows(settings: Settings, run_id: str) -> list[dict[str, Any]]:
    """Every current explanation of the run with its classification and headline scores."""
    with db.get_engine(settings).connect() as conn:
        rows = conn.execute(_current_query(run_id).order_by(_table.c.layer, _table.c.feature)).all()
    out = []
    for row in rows:
        d = _as_dict(row)
        scores = d.get("scores") or {}
        d.update({name: (scores.get(name) or {}).get("score") for name in ("detection", "fuzzing")})
        d["embedding_auc"] = (scores.get("embedding") or {}).get("score")
        d["causal"] = (scores.get("causal") or {}).get("score")
        d["updated_at"] = d["updated_at"].isoformat()
        out.append({k: d.get(k) for k in EXPORT_COLUMNS})
    return out


def with_explanations(settings: Settings, run_id: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label export rows with the feature's current explanation, its model and its classification."""
    with db.get_engine(settings).connect() as conn:
        current = {(r.layer, r.feature): r for r in conn.execute(_current_query(run_id)).all()}
    for row in rows:
        e = current.get((row["layer"], row["feature"]))
        row.update({"explanation": e.text if e else None, "explanation_model": e.model if e else None,
                    "reward_related": e.reward_related if e else None})
    return rows
