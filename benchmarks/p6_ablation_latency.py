"""P6: from submitting an ablation of 10 features (the top of the layer's default ranking) over
256 held-out texts on the demo RM, with its 10 random controls, to its result page being served,
with a warm worker (model, SAE loaded; a first ablation done).

The server runs in this process (uvicorn, loopback) and so does one worker (a thread), as
`rewardatlas serve` would with the worker it starts beside itself. Timed: POST the ablation,
poll its JSON, GET its result page; twice per job: when the chosen features' result is first
shown (the controls still running) and when the whole result with the controls' verdict is.
Two cases: the same 256 held-out texts as the warm-up (the worker reuses their clean scores)
and a set it has not scored yet. First, the cold start as after `make demo`: the worker loads
the run at start (`--warm`), then the first ablation is clicked.

    RA_DATA_DIR=data python benchmarks/p6_ablation_latency.py       # needs the demo run
"""
from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from backend.core import db
from backend.web.app import create_app
from backend.core.settings import Settings
from workers.worker import Worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(settings: Settings) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


@contextlib.contextmanager
def server_and_worker(settings: Settings, warm: str | None = None):
    """The server (uvicorn) and one worker, each a thread of this process; yields the server's URL
    once the worker waits for jobs (with `warm`: after loading that run)."""
    db.upgrade(settings)
    url, server, server_thread = serve(settings)
    worker = Worker(settings, poll_s=0.02)
    stop = threading.Event()
    worker_thread = threading.Thread(target=worker.run_forever, args=(stop, warm), daemon=True)
    worker_thread.start()
    while worker.state != "waiting for jobs":
        time.sleep(0.05)
    try:
        yield url
    finally:
        stop.set()
        server.should_exit = True
        for thread in (worker_thread, server_thread):  # let them end: a thread killed at exit aborts the process
            thread.join(timeout=30)


def ablate_and_show(client: httpx.Client, run: str, layer: int, body: dict, poll_s: float) -> tuple[float, dict, float]:
    """Seconds from the POST to the finished result page's HTML; the finished job; and seconds to
    the first result the page shows (the chosen features', before the controls)."""
    start = time.perf_counter()
    job = client.post(f"/api/runs/{run}/layers/{layer}/ablations", json=body).raise_for_status().json()
    first = None
    while True:
        job = client.get(f"/api/jobs/{job['id']}").raise_for_status().json()
        if first is None and job["result"]:
            client.get(f"/jobs/{job['id']}").raise_for_status()  # the page as it then shows
            first = time.perf_counter() - start
        if job["status"] not in ("queued", "running"):
            break
        time.sleep(poll_s)
    page = client.get(f"/jobs/{job['id']}").raise_for_status()
    elapsed = time.perf_counter() - start
    if job["status"] != "done" or 'id="mean-delta"' not in page.text:
        raise SystemExit(f"job {job['id']} ended {job['status']}: {job['error']}")
    return elapsed, job, first


def report(job: dict, what: str) -> None:
    r = job["result"]
    s, c = r["summary"], r["control"]
    t = c["test"]
    print(f"{what}, {s['n']} held-out texts: measured mean Δ reward {s['mean_delta']:+.4f} "
          f"(95% CI {s['ci_low']:+.4f} .. {s['ci_high']:+.4f}); predicted: regression {s['predicted_mean_delta']:+.4f}, "
          f"attribution {s['attribution_mean_delta']:+.4f}; {c['n_draws']} random controls {c['mean_delta']:+.4f} "
          f"({c['low']:+.4f} .. {c['high']:+.4f}); chosen - control {t['difference']:+.4f} "
          f"(95% CI {t['ci_low']:+.4f} .. {t['ci_high']:+.4f}, p {t['p_value']:.4f}); verdict {c['verdict']} "
          f"({c['reached_by']} of {c['n_draws']} draws reach it); "
          f"where the features fire ({r['where_fired']['summary']['n']} texts): {r['where_fired']['summary']['mean_delta']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--layer", type=int, default=None, help="default: the run's best layer")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status polls (the page polls every 0.3 s)")
    args = parser.parse_args()

    settings = Settings()
    started = time.perf_counter()
    with server_and_worker(settings, warm=args.run) as url, httpx.Client(base_url=url, timeout=120) as client:
        warmed = time.perf_counter() - started
        run = client.get(f"/api/runs/{args.run}").raise_for_status().json()
        layer = args.layer if args.layer is not None else run["best_layer"]
        body = {"selection": "top_ranked", "top_n": args.features, "mode": "zero", "n_texts": args.texts}
        cold, _, cold_first = ablate_and_show(client, args.run, layer, body, args.poll)
        print(f"cold start as after make demo: the worker loads run {args.run!r} at start in {warmed:.2f} s; then the "
              f"first ablation from the click: chosen features shown {cold_first:.2f} s, complete with "
              f"{body.get('n_controls', 10)} controls {cold:.2f} s  goal <= 10 s")
        same, fresh, same_first, fresh_first = [], [], [], []
        for i in range(args.repeats):
            elapsed, job, first = ablate_and_show(client, args.run, layer, body, args.poll)
            same.append(elapsed)
            same_first.append(first)
            other = {**body, "n_texts": args.texts + 1 + i}  # a set whose clean scores are not cached
            elapsed, _, first = ablate_and_show(client, args.run, layer, other, args.poll)
            fresh.append(elapsed)
            fresh_first.append(first)
        report(job, f"zero the top {args.features} features of layer {layer}'s default ranking")
        _, by_weight, _ = ablate_and_show(client, args.run, layer, {**body, "selection": "top_positive"}, args.poll)
        report(by_weight, f"zero the top {args.features} features by weight of layer {layer}")
        for what, firsts, totals in (("texts scored before", same_first, same), ("new texts", fresh_first, fresh)):
            print(f"P6 submit -> result page, warm worker, {what}: chosen features shown median "
                  f"{statistics.median(firsts):.2f} s (target <= 3 s); complete with the controls' verdict median "
                  f"{statistics.median(totals):.2f} s (runs: {', '.join(f'{t:.2f}' for t in totals)})")


if __name__ == "__main__":
    main()
