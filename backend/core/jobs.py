"""The job queue in the SQL database: submit, claim under a lease, heartbeat, finish, cancel.

A worker claims the oldest claimable job (queued, or running with an expired lease: its
worker died) in ONE statement: `UPDATE jobs ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED
LIMIT 1)` on PostgreSQL; SQLite ignores FOR UPDATE but runs the statement under its single
writer lock, and in WAL mode a writer whose snapshot went stale gets SQLITE_BUSY instead of
claiming the same row. Every later write names the lease owner, so a worker that lost its
lease can neither report progress nor finish: nothing is done twice.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from backend.core import db
from backend.core.job_kinds import KINDS
from backend.core.models import Job, WorkerPresence, utcnow
from backend.core.settings import Settings

DEFAULT_LEASE_S = 30.0
PRESENCE_S = 5.0  # how often a live worker touches its row
WORKER_GONE_S = 20.0  # a worker not seen for this long is taken for dead
FINISHED = ("done", "failed", "cancelled")


class JobRejected(ValueError):
    """A submission the queue refuses (e.g. too many queued jobs from one author): HTTP 4xx."""


class JobNotFound(LookupError):
    pass


def as_dict(job: Job) -> dict[str, Any]:
    return {c.name: getattr(job, c.name) for c in Job.__table__.columns}


def submit(settings: Settings, kind: str, params: dict, author: str, run_id: str | None = None) -> dict:
    if kind not in KINDS:
        raise JobRejected(f"unknown job kind {kind!r}")
    # The cap is checked in the transaction that inserts, after the insert: on SQLite the insert
    # takes the one writer lock first, so the count sees every committed job; on PostgreSQL one
    # author's submissions queue on an advisory lock held until commit. A count before the
    # insert, outside that, let concurrent submissions all pass it (25 accepted of 20).
    with db.session(settings) as s, s.begin():
        if s.bind.dialect.name == "postgresql":
            s.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:author))"), {"author": author})
        job = Job(kind=kind, params=params, run_id=run_id, author=author, status="queued", progress=0.0,
                  message="queued", cancel_requested=False, attempts=0, created_at=utcnow())
        s.add(job)
        s.flush()
        queued = s.scalar(sa.select(sa.func.count()).select_from(Job)
                          .where(Job.author == author, Job.status.in_(("queued", "running"))))
        if queued > settings.max_queued_jobs:  # rolled back with the transaction
            raise JobRejected(f"{author} already has {queued - 1} jobs queued or running (the limit is "
                              f"{settings.max_queued_jobs}): wait for some to finish or cancel them")
        return as_dict(job)


def get(settings: Settings, job_id: int) -> dict:
    with db.session(settings) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} not found")
        return as_dict(job)


def recent(settings: Settings, limit: int = 100) -> list[dict]:
    with db.session(settings) as s:
        return [as_dict(j) for j in s.scalars(sa.select(Job).order_by(Job.id.desc()).limit(limit))]


def claim(settings: Settings, worker: str, lease_s: float = DEFAULT_LEASE_S, kinds: tuple[str, ...] | None = None) -> dict | None:
    """Atomically take the oldest claimable job for `worker`; None when there is none. A job whose
    worker died after its cancel was asked for ends cancelled here: it is never started again."""
    kinds = tuple(KINDS) if kinds is None else kinds
    now = utcnow()
    abandoned = sa.and_(Job.status == "running", Job.lease_expires_at < now)
    cancel_abandoned = (sa.update(Job).where(Job.kind.in_(kinds), abandoned, Job.cancel_requested == sa.true())
                        .values(status="cancelled", message="cancelled (its worker stopped before it could)",
                                error="cancelled", finished_at=now, lease_expires_at=None))
    claimable = sa.and_(
        Job.kind.in_(kinds),
        sa.or_(Job.status == "queued", abandoned),
        sa.or_(Job.cancel_requested.is_(None), Job.cancel_requested == sa.false()),
    )
    oldest = (sa.select(Job.id).where(claimable).order_by(Job.id).limit(1)
              .with_for_update(skip_locked=True).scalar_subquery())
    stmt = (sa.update(Job).where(Job.id == oldest).where(claimable)
            .values(status="running", lease_owner=worker, lease_expires_at=now + timedelta(seconds=lease_s),
                    heartbeat_at=now, attempts=Job.attempts + 1, started_at=sa.func.coalesce(Job.started_at, now),
                    message="started")
            .returning(Job.id))
    with db.session(settings) as s, s.begin():
        s.execute(cancel_abandoned)
        job_id = s.execute(stmt).scalar()
    return get(settings, job_id) if job_id is not None else None


def _owned(job_id: int, worker: str):
    return sa.update(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status == "running")


def of_run(settings: Settings, kind: str, run_id: str, where, limit: int = 500) -> list[dict]:
    """A run's newest jobs of one kind whose params satisfy `where` (a predicate on the params
    dict), newest first. Params are JSON, filtered here rather than in SQL: the same code on
    SQLite and PostgreSQL; only the matching jobs' results are read."""
    with db.session(settings) as s:
        heads = s.execute(sa.select(Job.id, Job.params).where(Job.kind == kind, Job.run_id == run_id)
                          .order_by(Job.id.desc()).limit(limit)).all()
        ids = [job_id for job_id, params in heads if where(params or {})]
        if not ids:
            return []
        return [as_dict(j) for j in s.scalars(sa.select(Job).where(Job.id.in_(ids)).order_by(Job.id.desc()))]


def heartbeat(settings: Settings, job_id: int, worker: str, lease_s: float = DEFAULT_LEASE_S,
              progress: float | None = None, message: str | None = None) -> tuple[bool, bool]:
    """Extend the lease (and record progress). Returns (still ours, cancel requested)."""
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_s)}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if message is not None:
        values["message"] = message[:500]
    with db.session(settings) as s, s.begin():
        owned = s.execute(_owned(job_id, worker).values(**values)).rowcount == 1
        cancel = bool(s.scalar(sa.select(Job.cancel_requested).where(Job.id == job_id)))
    return owned, cancel


def publish_partial(settings: Settings, job_id: int, worker: str, result: dict) -> bool:
    """A running job's result so far (e.g. an ablation's chosen features before its controls),
    shown while the rest runs; only the lease owner may write it. False: not ours any more."""
    with db.session(settings) as s, s.begin():
        return s.execute(_owned(job_id, worker).values(result=result)).rowcount == 1


def finish(settings: Settings, job_id: int, worker: str, result: dict | None = None,
           error: str | None = None, status: str | None = None) -> bool:
    """Record the outcome, only if `worker` still holds the lease. False: someone else does."""
    status = status or ("failed" if error else "done")
    values = {"status": status, "result": result, "error": error, "finished_at": utcnow(),
              "lease_expires_at": None, "progress": 1.0 if status == "done" else Job.progress,
              "message": {"done": "done", "failed": "failed", "cancelled": "cancelled"}[status]}
    with db.session(settings) as s, s.begin():
        return s.execute(_owned(job_id, worker).values(**values)).rowcount == 1


def cancel(settings: Settings, job_id: int) -> dict:
    """A queued job is cancelled at once; a running one is asked to stop at its next heartbeat."""
    with db.session(settings) as s, s.begin():
        job = s.get(Job, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} not found")
        if job.status in FINISHED:
            raise JobRejected(f"job {job_id} is already {job.status}")
        if job.status == "queued":
            job.status, job.message, job.finished_at = "cancelled", "cancelled before it started", utcnow()
        job.cancel_requested = True
        s.flush()
        return as_dict(job)


# --- worker presence: whether a queued job will run at all ---

def worker_seen(settings: Settings, name: str, state: str) -> None:
    """Create or touch the worker's row (one statement each way: works on SQLite and PostgreSQL)."""
    now = utcnow()
    with db.session(settings) as s, s.begin():
        row = s.get(WorkerPresence, name)
        if row is None:
            s.add(WorkerPresence(name=name, started_at=now, seen_at=now, state=state[:200]))
        else:
            row.seen_at, row.state = now, state[:200]


def worker_gone(settings: Settings, name: str) -> None:
    with db.session(settings) as s, s.begin():
        s.execute(sa.delete(WorkerPresence).where(WorkerPresence.name == name))


def live_workers(settings: Settings) -> list[dict[str, Any]]:
    """Workers seen within WORKER_GONE_S, newest first."""
    since = utcnow() - timedelta(seconds=WORKER_GONE_S)
    with db.session(settings) as s:
        rows = s.scalars(sa.select(WorkerPresence).where(WorkerPresence.seen_at >= since)
                         .order_by(WorkerPresence.started_at.desc())).all()
        return [{"name": r.name, "started_at": r.started_at, "seen_at": r.seen_at, "state": r.state} for r in rows]
