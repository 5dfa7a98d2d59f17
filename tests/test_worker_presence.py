"""Whether a queued job will run: workers keep a presence row, pages say when none is alive,
and `rewardatlas serve` on the default database starts one beside itself and stops it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from backend.core import db, jobs
from backend.core.models import WorkerPresence, utcnow
from tests.helpers import REPO_ROOT, make_client, publish_synthetic_run, wait_for
from workers.worker import Worker

pytestmark = pytest.mark.sql_databases


def test_a_worker_is_seen_while_it_waits_and_gone_once_it_stops(migrated):
    assert jobs.live_workers(migrated) == []
    stop = threading.Event()
    worker = Worker(migrated, poll_s=0.05)
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    (seen,) = wait_for(lambda: jobs.live_workers(migrated), 10, "the worker's presence row")
    assert seen["name"] == worker.name
    wait_for(lambda: jobs.live_workers(migrated)[0]["state"] == "waiting for jobs", 10, "it to wait for jobs")
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and jobs.live_workers(migrated) == []


def test_a_worker_not_seen_lately_counts_as_gone(migrated):
    jobs.worker_seen(migrated, "old-worker", "waiting for jobs")
    assert [w["name"] for w in jobs.live_workers(migrated)] == ["old-worker"]
    with db.session(migrated) as s, s.begin():
        s.execute(sa.update(WorkerPresence).values(seen_at=utcnow() - timedelta(seconds=jobs.WORKER_GONE_S + 1)))
    assert jobs.live_workers(migrated) == []


def test_job_pages_say_when_no_worker_is_alive(migrated):
    publish_synthetic_run(migrated)
    job = jobs.submit(migrated, "ablation", {"run_id": "synthetic", "layer": 3, "features": [1], "mode": "zero"},
                      author="alice", run_id="synthetic")
    with make_client(migrated) as c:
        page = c.get(f"/jobs/{job['id']}").text
        assert 'id="no-worker"' in page and "No worker is running" in page
        assert 'id="no-worker"' in c.get("/jobs").text
        assert c.get("/api/workers").json() == {"workers": []}
        jobs.worker_seen(migrated, "w1", "waiting for jobs")
        page = c.get(f"/jobs/{job['id']}").text
        assert 'id="no-worker"' not in page and "1 worker live: waiting for jobs" in page
        assert [w["name"] for w in c.get("/api/workers").json()["workers"]] == ["w1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers_started_by(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--exit-with" in cmdline and str(pid).encode() in cmdline:
                found.append(int(proc.name))
    return found


@pytest.mark.sql_databases("sqlite")
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_serve_on_the_default_database_runs_a_worker_and_takes_it_down_with_it(tmp_path, how):
    port = _free_port()
    env = {**os.environ, "RA_DATA_DIR": str(tmp_path), "RA_DATABASE_URL": ""}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], cwd=REPO_ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/api/workers"

        def live():
            try:
                return httpx.get(url, timeout=2).json()["workers"]
            except httpx.HTTPError:
                return None
        (worker,) = wait_for(live, 120, "the worker serve starts", every=0.5)
        assert worker["state"] in ("starting", "waiting for jobs") or worker["state"].startswith("loading")
        (worker_pid,) = _workers_started_by(server.pid)
        if how == "stopped":
            server.send_signal(signal.SIGINT)  # Ctrl-C: the server stops the worker on its way out
        else:
            server.kill()  # no way out: the worker sees its server gone and stops itself
        server.wait(30)
        wait_for(lambda: not Path(f"/proc/{worker_pid}").exists() or
                 b"Z" in Path(f"/proc/{worker_pid}/stat").read_bytes().split(b")")[-1][:3], 30, "the worker to end")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
        log.close()
        for pid in _workers_started_by(server.pid):  # never leave one behind, whatever failed above
            os.kill(pid, signal.SIGKILL)


def test_serve_starts_no_worker_when_told_not_to_or_on_a_database_of_its_own():
    from backend.cli import build_parser, wants_embedded_worker
    from backend.core.settings import Settings

    args = build_parser().parse_args(["serve"])
    assert wants_embedded_worker(args, Settings(database_url=""))
    assert not wants_embedded_worker(build_parser().parse_args(["serve", "--no-worker"]), Settings(database_url=""))
    assert not wants_embedded_worker(args, Settings(database_url="postgresql+psycopg://u:p@127.0.0.1/db"))
    assert wants_embedded_worker(build_parser().parse_args(["demo"]), Settings(database_url=""))
