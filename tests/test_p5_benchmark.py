"""Smoke test of the P5 serving benchmark at a tiny size: the store builds with every table
filled and in primary-key order, the real server starts, and every request answers 200.
No timing assertions: the figures depend on the machine."""
from __future__ import annotations

import importlib.util
import sys

import duckdb
import pytest

from tests.helpers import REPO_ROOT


@pytest.fixture(scope="module")
def p5():
    path = REPO_ROOT / "benchmarks" / "p5_serving_latency.py"
    spec = importlib.util.spec_from_file_location("p5_serving_latency", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_p5_builds_serves_and_measures(p5, settings):
    build = p5.build_store(settings, saes=2, width=256, n_contexts=4, n_texts=100)
    assert build.rows["features"] == 2 * 256 and build.rows["contexts"] == 2 * 256 * 4
    assert build.rows["feature_tokens"] > 0
    with duckdb.connect(str(build.path), read_only=True) as con:
        # every column filled (bin and its bounds are NULL for top contexts only)
        for table, nullable in (("features", ()), ("contexts", ("bin", "bin_low", "bin_high"))):
            columns = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            for column in columns:
                nulls = con.execute(f"SELECT count(*) FROM {table} WHERE {column} IS NULL").fetchone()[0]
                assert nulls == 0 or column in nullable, (table, column)
        # rows in primary-key order: zone maps make point lookups cheap only then
        unordered = con.execute("""SELECT count(*) FROM (
            SELECT (layer, feature, kind, rank) < lag((layer, feature, kind, rank)) OVER (ORDER BY rowid) AS back
            FROM contexts) WHERE back""").fetchone()[0]
        assert unordered == 0
    assert p5.store_matches(build.path, p5.shape_key(2, 256, 4, 100))
    assert p5.build_store(settings, saes=2, width=256, n_contexts=4, n_texts=100).reused

    max_page = p5.filtered_pages(build.path, 2)
    with p5.serve(settings.data_dir, workers=2) as (base, proc):  # the multi-process server
        for name in ("feature", "feature-json", "table"):
            urls = p5.scenario_urls(name, 50, saes=2, width=256, max_page=max_page, seed=0)
            result = p5.load(base, urls, clients=4, seconds=60)
            assert result.failures == []
            assert len(result.latencies_ms) == 50
            assert result.percentile(95) > 0
            p5.report(name, 4, result)
        assert p5.server_rss_gib(proc) > 0


def test_a_login_holds_across_server_processes(p5, settings):
    """`serve --workers 2`: the processes share one session key, so a login made in one holds
    in the other (requests spread over both on new connections)."""
    import os
    import re

    import httpx

    p5.build_store(settings, saes=1, width=64, n_contexts=2, n_texts=10)
    os.environ["RA_USERS"] = "alice:wonder"
    try:
        with p5.serve(settings.data_dir, workers=2) as (base, _proc):
            with httpx.Client(base_url=base) as first:
                login = first.get("/login")
                token = re.search(r'name="csrf_token" value="([^"]+)"', login.text).group(1)
                done = first.post("/login", data={"csrf_token": token, "user": "alice", "password": "wonder"})
                assert done.status_code == 303
                cookies = dict(first.cookies)
            answers = set()
            for _ in range(20):  # a fresh connection each time: either process may answer
                with httpx.Client(base_url=base, cookies=cookies) as c:
                    answers.add(c.get("/api/runs").status_code)
            assert answers == {200}
            with httpx.Client(base_url=base) as stranger:
                assert stranger.get("/api/runs").status_code == 401
    finally:
        del os.environ["RA_USERS"]


def test_keep_alive_connections_are_recycled_so_they_spread_over_processes(p5, settings):
    """Every REQUESTS_PER_CONNECTION-th answer on a connection says `Connection: close`; the
    client reconnects (and whichever process is free accepts), and nothing fails."""
    import http.client
    from urllib.parse import urlsplit

    from backend.web.keepalive import REQUESTS_PER_CONNECTION as N

    p5.build_store(settings, saes=1, width=64, n_contexts=2, n_texts=10)
    with p5.serve(settings.data_dir, workers=2) as (base, _proc):
        conn = http.client.HTTPConnection(urlsplit(base).hostname, urlsplit(base).port, timeout=30)
        closing, ports, statuses = [], set(), set()
        for i in range(1, 2 * N + 11):
            conn.request("GET", "/api/runs")
            ports.add(conn.sock.getsockname()[1])
            answer = conn.getresponse()
            answer.read()
            statuses.add(answer.status)
            if (answer.getheader("connection") or "").lower() == "close":
                closing.append(i)
        conn.close()
    assert statuses == {200}
    assert closing == [N, 2 * N] and len(ports) == 3  # two reconnects, made by http.client itself
