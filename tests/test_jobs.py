"""The job queue: atomic claims, leases, heartbeats, cancellation, limits."""
from __future__ import annotations

import threading
import time

import pytest

from backend.core import jobs

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)


def test_each_job_is_claimed_by_exactly_one_of_many_workers(migrated):
    ids = [jobs.submit(migrated, "ablation", {"i": i}, author=f"user{i % 3}")["id"] for i in range(30)]
    claimed: dict[str, list[int]] = {}

    def worker(name):
        mine = claimed.setdefault(name, [])
        while True:
            try:
                job = jobs.claim(migrated, name, lease_s=60)
            except Exception as exc:  # SQLite refuses a writer with a stale snapshot: try again
                assert "locked" in str(exc) or "busy" in str(exc).lower()
                continue
            if job is None:
                return
            mine.append(job["id"])

    threads = [threading.Thread(target=worker, args=(f"w{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for mine in claimed.values() for i in mine]
    assert sorted(everything) == ids  # every job once, none twice
    assert all(jobs.get(migrated, i)["attempts"] == 1 for i in ids)


def test_expired_lease_is_claimed_again_and_the_old_owner_cannot_finish(migrated):
    job = jobs.submit(migrated, "ablation", {}, author="a")
    assert jobs.claim(migrated, "dead-worker", lease_s=0.2)["id"] == job["id"]
    assert jobs.claim(migrated, "other", lease_s=5) is None  # lease still held
    time.sleep(0.3)
    again = jobs.claim(migrated, "other", lease_s=5)
    assert again["id"] == job["id"] and again["attempts"] == 2 and again["lease_owner"] == "other"
    assert jobs.heartbeat(migrated, job["id"], "dead-worker")[0] is False
    assert jobs.finish(migrated, job["id"], "dead-worker", result={"x": 1}) is False
    assert jobs.finish(migrated, job["id"], "other", result={"x": 2}) is True
    done = jobs.get(migrated, job["id"])
    assert done["status"] == "done" and done["result"] == {"x": 2} and done["progress"] == 1.0


def test_heartbeat_extends_the_lease_and_records_progress(migrated):
    job = jobs.submit(migrated, "ablation", {}, author="a")
    jobs.claim(migrated, "w", lease_s=0.3)
    for _ in range(4):
        time.sleep(0.1)
        assert jobs.heartbeat(migrated, job["id"], "w", lease_s=0.3, progress=0.5, message="halfway") == (True, False)
    assert jobs.claim(migrated, "thief", lease_s=1) is None  # kept alive past its first lease
    current = jobs.get(migrated, job["id"])
    assert current["progress"] == 0.5 and current["message"] == "halfway"


def test_cancel_queued_and_running_jobs(migrated):
    queued = jobs.submit(migrated, "ablation", {}, author="a")
    assert jobs.cancel(migrated, queued["id"])["status"] == "cancelled"
    assert jobs.claim(migrated, "w") is None  # a cancelled job is never started
    running = jobs.submit(migrated, "ablation", {}, author="a")
    jobs.claim(migrated, "w")
    assert jobs.cancel(migrated, running["id"])["status"] == "running"
    assert jobs.heartbeat(migrated, running["id"], "w") == (True, True)  # the worker hears it
    with pytest.raises(jobs.JobRejected, match="already cancelled"):
        jobs.cancel(migrated, queued["id"])


def test_too_many_queued_jobs_from_one_author_are_refused(migrated):
    limited = migrated.model_copy(update={"max_queued_jobs": 3})
    for _ in range(3):
        jobs.submit(limited, "ablation", {}, author="eager")
    with pytest.raises(jobs.JobRejected, match="already has 3 jobs"):
        jobs.submit(limited, "ablation", {}, author="eager")
    jobs.submit(limited, "ablation", {}, author="someone else")  # the limit is per author


def test_a_cancelled_job_whose_worker_died_is_never_claimed_again(migrated):
    job = jobs.submit(migrated, "pipeline", {}, author="a")
    assert jobs.claim(migrated, "killed-worker", lease_s=0.2)["id"] == job["id"]
    assert jobs.cancel(migrated, job["id"])["status"] == "running"  # asked; the worker never hears it
    later = jobs.submit(migrated, "pipeline", {}, author="a")
    time.sleep(0.3)  # the dead worker's lease runs out
    taken = jobs.claim(migrated, "other", lease_s=5)
    assert taken["id"] == later["id"]  # the next job, not the cancelled one
    cancelled = jobs.get(migrated, job["id"])
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == 1 and cancelled["finished_at"] is not None
    assert cancelled["lease_expires_at"] is None
    assert jobs.claim(migrated, "other", lease_s=5) is None
    assert jobs.finish(migrated, job["id"], "killed-worker", result={"x": 1}) is False  # nor finished late
