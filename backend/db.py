"""SQL engine, sessions, migrations and the run registry.

SQLite file in the data dir by default, PostgreSQL when RA_DATABASE_URL is set. The schema
changes only through Alembic (migrations/); app code never calls metadata.create_all.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.orm import Session

from backend.models import Run, Sae
from backend.settings import Settings

# migrations/ sits next to backend/ in the repo (works from an editable install).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


class RunExistsError(Exception):
    """register_run was asked to add a run id that is already registered (without replace)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # SQLite ignores foreign keys (and so ON DELETE CASCADE) unless asked, per connection.
    # WAL lets the web server read while a worker writes.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


def get_engine(settings: Settings) -> sa.Engine:
    """One engine per database URL for the life of the process."""
    url = settings.sql_url
    with _lock:
        if url not in _engines:
            if url.startswith("sqlite"):
                settings.data_dir.mkdir(parents=True, exist_ok=True)
                # FastAPI runs sync routes in a thread pool, so connections cross threads.
                engine = sa.create_engine(url, connect_args={"check_same_thread": False})
                sa.event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = sa.create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return _engines[url]


def dispose_engines() -> None:
    """Close every pooled connection (tests, and before deleting a SQLite file)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session(settings: Settings) -> Session:
    """A new ORM session; use as `with session(settings) as s:`."""
    return Session(get_engine(settings), expire_on_commit=False)


def alembic_config(settings: Settings) -> Config:
    """Alembic config built in code; migrations/env.py reads `settings` from attributes."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", settings.sql_url.replace("%", "%%"))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database to `revision` (idempotent; run at every start)."""
    command.upgrade(alembic_config(settings), revision)


def _plain(row: Mapping[str, Any]) -> dict[str, Any]:
    """numpy scalars (the pipeline's columns) -> Python values every DB driver accepts."""
    return {k: v.item() if hasattr(v, "item") and hasattr(v, "dtype") else v for k, v in row.items()}


def register_run(
    settings: Settings,
    run_row: Mapping[str, Any],
    sae_rows: Iterable[Mapping[str, Any]],
    *,
    replace: bool = False,
) -> None:
    """Insert a run and its SAEs in one transaction: either all rows land or none do.

    `run_row` has the columns of models.Run, each of `sae_rows` those of models.Sae (run_id
    may be left out). Run.store_path may be relative to the data dir (runs/<id>/features.duckdb). Call it last, once the run's feature store is in place, so that a
    registered run always has a readable store.
    """
    run_id = run_row["id"]
    with session(settings) as s, s.begin():
        existing = s.get(Run, run_id)
        if existing is not None:
            if not replace:
                raise RunExistsError(f"run {run_id!r} is already registered (use replace=True)")
            s.delete(existing)
            s.flush()  # delete the old rows before inserting new ones with the same keys
        saes = [Sae(**{k: v for k, v in _plain(row).items() if k != "run_id"}) for row in sae_rows]
        s.add(Run(**_plain(run_row), saes=saes))


_RUN_BY_ID = sa.select(Run.__table__).where(Run.__table__.c.id == sa.bindparam("run_id"))


def find_run(settings: Settings, run_id: str) -> sa.Row | None:
    """The run's registry row (its columns as attributes), or None. A Core read, not the ORM:
    every page asks for its run, and Session.get spends ~0.45 of its ~0.55 ms on ORM bookkeeping."""
    with get_engine(settings).connect() as conn:
        return conn.execute(_RUN_BY_ID, {"run_id": run_id}).first()


def run_exists(settings: Settings, run_id: str) -> bool:
    return find_run(settings, run_id) is not None


def delete_run(settings: Settings, run_id: str) -> bool:
    """Remove a run and its SAEs from the registry (files on disk are left alone).

    Returns False when no such run was registered.
    """
    with session(settings) as s, s.begin():
        run = s.get(Run, run_id)
        if run is None:
            return False
        s.delete(run)
    return True
