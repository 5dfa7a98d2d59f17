"""What the multi-user database must hold to: concurrent label writers lose no edit,
concurrent workers claim each job exactly once (on PostgreSQL and, where the same promise
holds, on SQLite), and times read back are UTC whatever the PostgreSQL server's time zone."""
from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from backend.core import db, jobs, labels
from backend.core.models import LABELS, LabelEvent
from backend.core.settings import Settings
from tests.helpers import make_client, publish_synthetic_run

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

RUN = "synthetic"
N_WORKERS, N_JOBS = 4, 40
# a clear ("") in the cycle: the label's row is deleted and inserted again, the racier path
EDITS = (*LABELS, "")


def test_concurrent_label_writers_lose_no_edit(migrated, synthetic_run):
    """8 writers x 200 edits on 3 shared features; a refused (stale) edit is retried from the
    version the refusal names, as a user reloading the page would."""
    writers, edits, features = 8, 200, (20, 21, 22)
    accepted: list[list[dict]] = [[] for _ in range(writers)]
    refused = [0] * writers
    errors: list[str] = []
    start = threading.Barrier(writers)

    def writer(w: int) -> None:
        known = dict.fromkeys(features, 0)
        try:
            start.wait()
            for i in range(edits):
                feature = features[(w + i) % len(features)]
                label = EDITS[(w + i) % len(EDITS)]
                note = f"w{w} #{i}" if label else ""  # unique: every set changes the label
                while True:
                    try:
                        done = labels.set_label(migrated, RUN, 3, feature, label, note, f"writer{w}", known[feature])
                    except labels.StaleLabel as stale:
                        known[feature] = stale.current["version"]
                        refused[w] += 1
                        continue
                    if done["version"] != known[feature]:  # not a clear of a cleared label (no-op)
                        accepted[w].append(done)
                    known[feature] = done["version"]
                    break
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(f"writer {w}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sum(refused) > 0, "the writers never collided: the test proved nothing"

    with db.session(migrated) as s:
        events = s.scalars(sa.select(LabelEvent).order_by(LabelEvent.feature, LabelEvent.version)).all()
    made = sorted((e["feature"], e["version"], e["label"], e["note"] if e["label"] else None, e["author"])
                  for mine in accepted for e in mine)
    # every accepted edit is in the history, once, as it was accepted; nothing else is
    assert sorted((e.feature, e.version, e.new_label, e.new_note, e.author) for e in events) == made
    assert len(made) >= writers * edits * 3 // 4  # most edits change the label (few are no-op clears)
    for feature in features:
        mine = [e for e in events if e.feature == feature]
        assert [e.version for e in mine] == list(range(1, len(mine) + 1))  # no gaps, no duplicates
        for before, after in zip([None, *mine], mine):  # each event starts where the last one ended
            assert (after.old_label, after.old_note) == ((before.new_label, before.new_note) if before else (None, None))
        now = labels.current(migrated, RUN, 3, feature)
        assert (now["label"], now["note"] or None, now["version"]) == (mine[-1].new_label, mine[-1].new_note, len(mine))


def _claim_all(data_dir: str, database_url: str, name: str, start, results) -> None:
    """One worker process: claim (and finish) jobs until the queue is empty."""
    settings = Settings(data_dir=data_dir, database_url=database_url)
    mine, busy = [], 0
    try:
        start.wait(60)
        while True:
            try:
                job = jobs.claim(settings, name, lease_s=120)
            except sa.exc.OperationalError as exc:  # SQLite: a writer with a stale snapshot is refused
                assert "locked" in str(exc) or "busy" in str(exc).lower(), exc
                busy += 1
                time.sleep(0.001)
                continue
            if job is None:
                break
            mine.append(job["id"])
            assert jobs.finish(settings, job["id"], name, result={"by": name}), f"{name} lost job {job['id']}"
        results.put((name, mine, busy, None))
    except Exception as exc:  # noqa: BLE001  (reported by the test)
        results.put((name, mine, busy, repr(exc)))
    finally:
        db.dispose_engines()


def test_concurrent_workers_claim_each_job_exactly_once(migrated):
    """4 worker processes (each its own connections, as `rewardatlas worker` has) race for 40 jobs."""
    ids = [jobs.submit(migrated, "ablation", {"i": i}, author=f"user{i % 4}")["id"] for i in range(N_JOBS)]
    ctx = multiprocessing.get_context("spawn")  # no connection pool crosses a fork
    start, results = ctx.Barrier(N_WORKERS), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(migrated.data_dir), migrated.database_url, f"w{n}", start, results))
             for n in range(N_WORKERS)]
    for proc in procs:
        proc.start()
    try:
        reports = [results.get(timeout=180) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    assert [r[3] for r in reports] == [None] * N_WORKERS, reports
    claimed = {name: mine for name, mine, _, _ in reports}
    assert sorted(i for mine in claimed.values() for i in mine) == ids  # every job once, none twice
    assert sum(1 for mine in claimed.values() if mine) >= 2, f"one worker took every job: {claimed}"
    owner = {i: name for name, mine in claimed.items() for i in mine}
    for i in ids:
        job = jobs.get(migrated, i)
        assert (job["status"], job["attempts"], job["lease_owner"], job["result"]) == (
            "done", 1, owner[i], {"by": owner[i]})


@pytest.mark.sql_databases("postgresql")  # SQLite keeps no time zone: it hands back what was written
def test_times_are_utc_whatever_the_servers_time_zone(settings):
    """timestamptz values come back in the session's TimeZone, and the pages print them as UTC:
    a server set to UTC+14 must not shift a label's time by 14 hours."""
    name = sa.engine.make_url(settings.database_url).database
    with sa.create_engine(settings.database_url, poolclass=sa.NullPool).connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" SET TimeZone TO \'Pacific/Kiritimati\''))
        conn.commit()
    db.upgrade(settings)
    publish_synthetic_run(settings)
    before = datetime.now(timezone.utc)
    labels.set_label(settings, RUN, 3, 5, "reward", "", "alice", 0)
    job = jobs.submit(settings, "ablation", {}, author="alice")
    for when in (labels.current(settings, RUN, 3, 5)["updated_at"], labels.history(settings, RUN, 3, 5)[0]["created_at"],
                 jobs.get(settings, job["id"])["created_at"]):
        assert when.utcoffset() == timedelta(0), f"{when} is not in UTC"
        assert abs(when - before) < timedelta(minutes=5)
    shown = labels.current(settings, RUN, 3, 5)["updated_at"].strftime("%Y-%m-%d %H:%M")
    with make_client(settings) as client:
        assert f"{shown} UTC</time>" in client.get(f"/runs/{RUN}/layers/3/features/5").text


def test_the_job_cap_holds_under_concurrent_submissions(migrated):
    """8 threads submit 6 jobs each for one author with a cap of 20: exactly 20 are accepted.
    A count read outside the inserting transaction let 25 of 20 through."""
    capped = migrated.model_copy(update={"max_queued_jobs": 20})
    threads, each = 8, 6
    accepted, refused, errors = [], [], []
    start = threading.Barrier(threads)

    def submitter() -> None:
        start.wait()
        for _ in range(each):
            try:
                accepted.append(jobs.submit(capped, "inference", {"text": "x"}, "alice")["id"])
            except jobs.JobRejected:
                refused.append(1)
            except Exception as exc:  # noqa: BLE001 -- any other failure fails the test below
                errors.append(repr(exc))

    pool = [threading.Thread(target=submitter) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors, errors[:3]
    assert len(accepted) == 20 and len(refused) == threads * each - 20
    assert len(jobs.recent(capped, 1000)) == 20
    # another author is not held back by alice's jobs
    assert jobs.submit(capped, "inference", {"text": "x"}, "bob")["author"] == "bob"
