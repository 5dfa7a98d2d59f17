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
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)

    saes: Mapped[list["Sae"]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Sae.layer"
    )


class Sae(Base):
    """One trained SAE (SAELens format on disk) and its training metrics."""

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
    mse: Mapped[float] = mapped_column(sa.Double)
    explained_variance: Mapped[float] = mapped_column(sa.Double)
    l0: Mapped[float] = mapped_column(sa.Double)
    dead_fraction: Mapped[float] = mapped_column(sa.Double)
    r2_heldout: Mapped[float] = mapped_column(sa.Double)

    run: Mapped[Run] = relationship(back_populates="saes")
