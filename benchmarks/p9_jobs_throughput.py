"""P9: jobs per hour with 1, 2 and 4 workers on one PostgreSQL, each beside linear scaling
(n x the 1-worker rate), measured in one run.

The workers are `rewardatlas worker` processes, one torch thread each. The jobs are real
ablations: 5 features of a layer zeroed over the run's held-out texts, with 3 random controls,
on a tiny run this script makes first (a random 3-layer BERT reward model and its SAEs,
trained by the pipeline on 240 generated reviews, as tests/test_pipeline.py does). Per worker
count: the workers start and each finishes a warm-up job (model and SAE loaded, held-out
texts scored), then JOBS x n jobs are queued and the rate is taken from the database's own
timestamps, first start to last finish.

The database is a new one on the server that tests/pg.py finds: RA_TEST_POSTGRES_URL, else a
throwaway cluster (fsync off: commits are cheaper than on a durable server; the output says
which settings the server had).

    python benchmarks/p9_jobs_throughput.py
    RA_TEST_POSTGRES_URL=postgresql+psycopg://user:pw@127.0.0.1:5432/postgres python benchmarks/p9_jobs_throughput.py
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # tests/: the PostgreSQL finder and the tiny model builder

import sqlalchemy as sa  # noqa: E402

from backend.core import db, jobs  # noqa: E402
from backend.core.models import Job  # noqa: E402
from backend.core.settings import Settings  # noqa: E402
from tests import pg  # noqa: E402

RUN_ID = "p9-tiny"
LAYER = 2
N_FEATURES = 64


def make_tiny_run(settings: Settings, root: Path) -> None:
    from tests.tiny_models import save_tiny_bert
    from backend.core.run_config import parse_config
    from workers.demo_corpus import generate_corpus, vader_reward
    from workers.pipeline import run_pipeline

    model = save_tiny_bert(root / "tiny-bert")
    dataset = root / "reviews.jsonl"
    with dataset.open("w") as f:
        for text in generate_corpus(240, seed=7):
            f.write(json.dumps({"text": text, "reward": vader_reward(text)}) + "\n")
    config = parse_config({
        "name": "P9 tiny", "run_id": RUN_ID, "model": {"path": str(model), "max_length": 32},
        "dataset": {"source": str(dataset), "batch_size": 32}, "layers": [0, LAYER],
        "sae": {"width": N_FEATURES, "k": 4, "training_tokens": 4096, "batch_size": 256, "buffer_tokens": 1024},
        "analysis": {"n_contexts": 5}, "regression": {"pooling": "mean"},
    })
    run_pipeline(config, settings)


def submit(settings: Settings, i: int, n_texts: int) -> int:
    features = sorted({(7 * i + 3 * j) % N_FEATURES for j in range(5)})  # a different edit each job
    params = {"run_id": RUN_ID, "layer": LAYER, "features": features, "mode": "zero", "value": None,
              "tokens": None, "n_texts": n_texts, "texts": None, "control": True, "n_controls": 3,
              "described": f"features {', '.join(map(str, features))}"}
    return jobs.submit(settings, "ablation", params, f"bench{i % 8}", RUN_ID)["id"]


def wait_done(settings: Settings, ids: list[int], timeout: float) -> list[Job]:
    deadline = time.time() + timeout
    while True:
        with db.session(settings) as s:
            rows = s.scalars(sa.select(Job).where(Job.id.in_(ids))).all()
        if all(r.status not in ("queued", "running") for r in rows):
            failed = [r for r in rows if r.status != "done"]
            if failed:
                raise SystemExit(f"job {failed[0].id} ended {failed[0].status}: {failed[0].error}")
            return rows
        if time.time() > deadline:
            raise SystemExit(f"jobs not done after {timeout:.0f} s")
        time.sleep(0.05)


def start_workers(n: int, settings: Settings, logs: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "RA_DATA_DIR": str(settings.data_dir), "RA_DATABASE_URL": settings.database_url,
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core's work per worker
    return [subprocess.Popen([sys.executable, "-m", "backend.cli", "worker", "--poll", "0.05"], cwd=REPO_ROOT, env=env,
                             stdout=(logs / f"worker-{n}-{k}.log").open("w"), stderr=subprocess.STDOUT)
            for k in range(n)]


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGINT)  # the worker's own clean stop
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure(settings: Settings, n: int, per_worker: int, n_texts: int, logs: Path, counter: itertools.count) -> dict:
    procs = start_workers(n, settings, logs)
    try:
        # warm-up: until every worker has finished a job (loaded the run, scored the texts)
        owners: set[str] = set()
        for _ in range(20):
            batch = [submit(settings, next(counter), n_texts) for _ in range(n)]
            owners |= {r.lease_owner for r in wait_done(settings, batch, 600)}
            if len(owners) >= n:
                break
        else:
            raise SystemExit(f"only {len(owners)} of {n} workers took a warm-up job")
        ids = [submit(settings, next(counter), n_texts) for _ in range(per_worker * n)]
        rows = wait_done(settings, ids, 1800)
    finally:
        stop_workers(procs)
    if max(r.attempts for r in rows) != 1 or len({r.lease_owner for r in rows}) != n:
        raise SystemExit(f"{n} workers: a job ran twice or a worker sat idle; not a fair measurement")
    span = (max(r.finished_at for r in rows) - min(r.started_at for r in rows)).total_seconds()
    return {"workers": n, "jobs": len(rows), "seconds": span, "per_hour": len(rows) / span * 3600,
            "median_job_s": statistics.median((r.finished_at - r.started_at).total_seconds() for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--jobs", type=int, default=100, help="jobs timed per worker (JOBS x n in all)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over every worker count, interleaved; each count's median round is reported")
    parser.add_argument("--texts", type=int, default=48, help="held-out texts per ablation")
    args = parser.parse_args()

    server = pg.start()
    with tempfile.TemporaryDirectory(prefix="ra-p9-") as tmp, server.database() as url:
        root = Path(tmp)
        settings = Settings(data_dir=root / "data", database_url=url, max_queued_jobs=10**6)
        db.upgrade(settings)
        with db.get_engine(settings).connect() as conn:
            knobs = {k: conn.exec_driver_sql(f"SHOW {k}").scalar()
                     for k in ("server_version", "fsync", "synchronous_commit")}
        start = time.perf_counter()
        make_tiny_run(settings, root)
        print(f"tiny run made in {time.perf_counter() - start:.0f} s; PostgreSQL {knobs['server_version']} "
              f"(fsync {knobs['fsync']}, synchronous_commit {knobs['synchronous_commit']}); "
              f"{os.cpu_count()} CPU cores; ablation of 5 features over {args.texts} held-out texts + 3 controls",
              flush=True)
        counter, rounds = itertools.count(), {n: [] for n in args.workers}
        for i in range(args.rounds):  # interleaved: load from elsewhere on the machine hits every count alike
            for n in args.workers:
                r = measure(settings, n, args.jobs, args.texts, root, counter)
                rounds[n].append(r)
                print(f"  round {i + 1}, {n} worker(s): {r['jobs']} jobs in {r['seconds']:.1f} s "
                      f"({r['per_hour']:,.0f} jobs/hour)", flush=True)
        db.dispose_engines()
    results = [sorted(rs, key=lambda r: r["per_hour"])[(len(rs) - 1) // 2] for rs in rounds.values()]
    server.close()
    base = next((r["per_hour"] / r["workers"] for r in results if r["workers"] == 1), None)
    print(f"\n{'workers':>7} {'jobs':>5} {'seconds':>8} {'jobs/hour':>10} {'vs linear':>10} {'median job':>11}")
    for r in results:
        ratio = f"{r['per_hour'] / (r['workers'] * base):.2f}" if base else "-"
        print(f"{r['workers']:>7} {r['jobs']:>5} {r['seconds']:>8.1f} {r['per_hour']:>10,.0f} {ratio:>10} "
              f"{r['median_job_s']:>10.3f}s")
    if base:
        print("vs linear: jobs/hour over n x the 1-worker rate (1.00 = linear)")


if __name__ == "__main__":
    main()
