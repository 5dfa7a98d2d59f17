"""Alembic environment: the URL comes from Settings, the target schema from backend.core.models."""
from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from backend.core.db import get_engine
from backend.core.models import Base
from backend.core.settings import get_settings

config = context.config
# backend.core.db.upgrade() passes its Settings; the alembic CLI falls back to the environment.
settings = config.attributes.get("settings") or get_settings()
if config.config_file_name and "settings" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)  # CLI only

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=settings.sql_url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with get_engine(settings).connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
