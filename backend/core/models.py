"""SQL tables for everything mutable. The schema changes only through Alembic (migrations/)."""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Run(Base):
    """A finished pipeline run whose feature store is in place."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    model: Mapped[str] = mapped_column(sa.String(500))
    adapter: Mapped[str] = mapped_column(sa.String(50))
    dataset: Mapped[str] = mapped_column(sa.String(500))
    config_yaml: Mapped[str] = mapped_column(sa.Text)
    store_path: Mapped[str] = mapped_column(sa.String(1000))
    n_texts: Mapped[int] = mapped_column(sa.Integer)
    n_tokens: Mapped[int] = mapped_column(sa.Integer)
    # what the runs list shows, chosen once by the pipeline (backend/core/layer_choice.py) and also
    # in the store's run_info; every other layer metric lives in the store only
    best_layer: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    best_r2_heldout: Mapped[float | None] = mapped_column(sa.Double, nullable=True)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    # 1 when first registered, +1 each time the run is replaced (re-run with replace): the
    # run's labels stay, and say which version they were made on
    version: Mapped[int] = mapped_column(sa.Integer, default=1, server_default="1")

    saes: Mapped[list["Sae"]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Sae.layer"
    )


class Sae(Base):
    """One trained SAE (SAELens format on disk): its identity. Its metrics are in the run's store."""

    __tablename__ = "saes"
    __table_args__ = (sa.UniqueConstraint("run_id", "layer"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    layer: Mapped[int] = mapped_column(sa.Integer)
    hook_name: Mapped[str] = mapped_column(sa.String(200))
    path: Mapped[str] = mapped_column(sa.String(1000))
    architecture: Mapped[str] = mapped_column(sa.String(50))
    d_in: Mapped[int] = mapped_column(sa.Integer)
    d_sae: Mapped[int] = mapped_column(sa.Integer)
    # sha256 of its weights file: a label made on another SAE of this layer is marked as such
    fingerprint: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)

    run: Mapped[Run] = relationship(back_populates="saes")


# --- the interactive loop: jobs for the worker, labels and their history ---

class WorkerPresence(Base):
    """A live worker: touched every few seconds (workers/worker.py), removed when it stops; one
    not seen for backend.core.jobs.WORKER_GONE_S is taken for dead."""
    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    state: Mapped[str] = mapped_column(sa.String(200), default="")  # "loading run demo", "waiting for jobs"


JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")


class Job(Base):
    """Work for `rewardatlas worker`: claimed under a lease that heartbeats extend, so a job
    whose worker died is claimed again once its lease expires."""

    __tablename__ = "jobs"
    __table_args__ = (sa.Index("ix_jobs_claim", "status", "lease_expires_at"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(sa.String(20))
    run_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    params: Mapped[dict] = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.String(20), default="queued")
    progress: Mapped[float] = mapped_column(sa.Double, default=0.0)  # 0..1
    message: Mapped[str] = mapped_column(sa.String(500), default="")  # what the job is doing now
    result: Mapped[dict | None] = mapped_column(sa.JSON)
    error: Mapped[str | None] = mapped_column(sa.Text)
    author: Mapped[str] = mapped_column(sa.String(100))
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(sa.DateTime(timezone=True))


LABELS = ("reward", "not_reward", "unsure")


class Label(Base):
    """A feature's current label. `version` grows by one per change: an edit names the version
    it was made from, and a stale one is refused instead of overwriting a newer label."""

    __tablename__ = "labels"

    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    feature: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    label: Mapped[str] = mapped_column(sa.String(20))
    note: Mapped[str] = mapped_column(sa.Text, default="")
    version: Mapped[int] = mapped_column(sa.Integer)
    author: Mapped[str] = mapped_column(sa.String(100))
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    # the layer's SAE (Sae.fingerprint) and the run's version the label was made on
    sae_fingerprint: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    run_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)


class LabelEvent(Base):
    """One change of a label: who, when, old -> new. Never updated or deleted."""

    __tablename__ = "label_events"
    __table_args__ = (sa.Index("ix_label_events_feature", "run_id", "layer", "feature"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(sa.Integer)
    feature: Mapped[int] = mapped_column(sa.Integer)
    version: Mapped[int] = mapped_column(sa.Integer)  # the label's version after this change
    old_label: Mapped[str | None] = mapped_column(sa.String(20))
    new_label: Mapped[str | None] = mapped_column(sa.String(20))
    old_note: Mapped[str | None] = mapped_column(sa.Text)
    new_note: Mapped[str | None] = mapped_column(sa.Text)
    author: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    sae_fingerprint: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    run_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)


REWARD_RELATED = ("yes", "no", "unsure")


class Explanation(Base):
    """One version of a feature's explanation (backend/core/explanations.py): its text and who wrote it
    (an LLM endpoint's model, the offline explainer, or a person), then the reward-related
    classification and the scores made on this text. A new text is a new version; the highest is
    current. Kept through a replaced run (the run row is updated in place), like labels, with the
    run version and SAE it was made on."""

    __tablename__ = "explanations"
    __table_args__ = (sa.UniqueConstraint("run_id", "layer", "feature", "version"),
                      sa.Index("ix_explanations_feature", "run_id", "layer", "feature"))

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    layer: Mapped[int] = mapped_column(sa.Integer)
    feature: Mapped[int] = mapped_column(sa.Integer)
    version: Mapped[int] = mapped_column(sa.Integer)
    text: Mapped[str] = mapped_column(sa.Text)
    explainer: Mapped[str] = mapped_column(sa.String(20))  # "llm", "offline" or "human"
    model: Mapped[str] = mapped_column(sa.String(200))
    prompt_version: Mapped[str] = mapped_column(sa.String(20))
    tokens: Mapped[int] = mapped_column(sa.Integer, default=0)  # sent + received writing it
    embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary, nullable=True)  # MiniLM, float32
    # what it was written from (the feature's top tokens), searched beside the text
    evidence: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    evidence_embedding: Mapped[bytes | None] = mapped_column(sa.LargeBinary, nullable=True)
    reward_related: Mapped[str | None] = mapped_column(sa.String(10), nullable=True)
    reason: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    classified_by: Mapped[str | None] = mapped_column(sa.String(250), nullable=True)  # "model @ prompt version"
    classify_tokens: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    scores: Mapped[dict | None] = mapped_column(sa.JSON, nullable=True)
    scored_by: Mapped[str | None] = mapped_column(sa.String(250), nullable=True)
    job_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    author: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
    sae_fingerprint: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    run_version: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)


class WebSession(Base):
    """A signed-in browser session: the cookie names its id, and logging out deletes the row,
    so a copied cookie stops working at logout (a signed cookie alone would stay valid)."""

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    author: Mapped[str] = mapped_column(sa.String(100))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)
