"""The guards in front of the app (backend/web/guard.py): hosts it answers to, cross-site requests,
bounded bodies, and the security headers on every response, with pages that need no inline script."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import httpx
import pytest
import uvicorn

from backend.core import jobs
from backend.web.app import create_app
from backend.web.guard import allowed_hosts, host_name
from tests.helpers import CONTEXT_FEATURE, TestClient, make_client
from tests.test_browser import _free_port, live_server, page  # noqa: F401  (fixtures)

RUN = "/runs/synthetic"
ABLATE = f"/api{RUN}/layers/3/ablations"
SMALL = {"features": [1], "mode": "zero"}


def csrf(client, path="/jobs"):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


# --- hosts ---

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "0.0.0.0:8000"])
def test_a_host_not_allowed_is_400_naming_it_and_the_setting(client, host):
    for path in ("/api/runs", "/", "/static/style.css"):
        r = client.get(path, headers={"host": host})
        assert r.status_code == 400, path
        assert host_name(host) in r.text and "RA_ALLOWED_HOSTS" in r.text
    assert client.get("/api/runs", headers={"host": host}).json()["detail"].startswith("host ")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"])
def test_the_loopback_names_are_answered(client, host):
    assert client.get("/api/runs", headers={"host": host}).status_code == 200


def test_allowed_hosts_adds_names_and_the_bind_host_counts_unless_it_is_a_wildcard(migrated, synthetic_run):
    named = migrated.model_copy(update={"allowed_hosts": "Dash.Example.org, other.example"})
    assert allowed_hosts(named) == {"127.0.0.1", "::1", "localhost", "dash.example.org", "other.example"}
    with make_client(named) as c:
        assert c.get("/api/runs", headers={"host": "dash.example.org:443"}).status_code == 200
        assert c.get("/api/runs", headers={"host": "evil.example"}).status_code == 400
    bound = migrated.model_copy(update={"host": "10.1.2.3", "token": "s3cret"})
    assert "10.1.2.3" in allowed_hosts(bound)
    assert "0.0.0.0" not in allowed_hosts(migrated.model_copy(update={"host": "0.0.0.0"}))
    assert "::" not in allowed_hosts(migrated.model_copy(update={"host": "::"}))
    anything = migrated.model_copy(update={"allowed_hosts": "*"})
    assert allowed_hosts(anything) is None
    with make_client(anything) as c:
        assert c.get("/api/runs", headers={"host": "whatever.example"}).status_code == 200
        # any host, but a post still comes from the host it names
        assert c.post(ABLATE, json=SMALL, headers={"host": "a.example", "origin": "http://b.example"}).status_code == 403
        assert c.post(ABLATE, json=SMALL, headers={"host": "a.example", "origin": "http://a.example"}).status_code == 201


# --- cross-site requests ---

@pytest.mark.parametrize("headers, named", [
    ({"origin": "http://evil.example"}, "Origin"),
    ({"origin": "null"}, "Origin"),
    ({"origin": "http://127.0.0.1.evil.example:8000"}, "Origin"),
    ({"referer": "https://evil.example/page?x=1"}, "Referer"),
    ({"origin": "http://evil.example", "referer": "http://127.0.0.1/runs"}, "Origin"),
    # another port or scheme of a loopback name is another origin: a page served there is not this server
    ({"origin": "http://127.0.0.1:9999"}, "Origin"),
    ({"origin": "http://localhost:9999"}, "Origin"),
    ({"origin": "https://127.0.0.1"}, "Origin"),
    ({"referer": "http://localhost:5000/page"}, "Referer"),
    ({"origin": "http://127.0.0.1:99999"}, "Origin"),
    ({"origin": "file://"}, "Origin"),
])
def test_state_changing_requests_from_another_site_are_403(client, migrated, headers, named):
    for method in ("post", "put", "delete"):
        r = client.request(method, ABLATE, json=SMALL, headers=headers)
        assert r.status_code == 403 and "cross-site" in r.json()["detail"] and named in r.json()["detail"]
    form = client.post("/jobs/1/cancel", data={"csrf_token": csrf(client)}, headers=headers)
    assert form.status_code == 403 and "cross-site" in form.text
    assert jobs.recent(migrated) == []
    assert client.get("/api/runs", headers=headers).status_code == 200  # reading is left to the browser's same-origin rule


@pytest.mark.parametrize("headers", [{}, {"origin": "http://127.0.0.1"}, {"origin": "http://localhost"},
                                     {"origin": "http://127.0.0.1:80"}, {"referer": "http://[::1]/runs/synthetic"},
                                     {"host": "127.0.0.1:8000", "origin": "http://localhost:8000"}])
def test_requests_from_this_site_or_a_script_are_served(client, migrated, headers):
    r = client.post(ABLATE, json=SMALL, headers=headers)
    assert r.status_code == 201, r.text


# --- bounded bodies ---

def test_a_body_over_the_limit_is_413_by_length_or_as_it_streams(migrated, synthetic_run):
    with make_client(migrated.model_copy(update={"max_body_bytes": 1000})) as c:
        big = {**SMALL, "texts": ["x" * 2000]}
        r = c.post(ABLATE, json=big)
        assert r.status_code == 413 and "RA_MAX_BODY_BYTES" in r.json()["detail"] and "1,000" in r.json()["detail"]
        chunked = c.post(ABLATE, content=(part for part in [json.dumps(big).encode()]),
                         headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413 and "RA_MAX_BODY_BYTES" in chunked.json()["detail"]
        form = c.post("/jobs", content=(p for p in [b"config_yaml=" + b"y" * 2000]),
                      headers={"content-type": "application/x-www-form-urlencoded"})
        assert form.status_code == 413 and "RA_MAX_BODY_BYTES" in form.text
        assert c.post(ABLATE, json=SMALL).status_code == 201  # under the limit: served
    assert len(jobs.recent(migrated)) == 1


def test_the_default_limit_fits_the_largest_real_body(client, migrated):
    # 256 typed texts of 4,000 characters, each one escaped as a surrogate pair: 12 bytes a character
    texts = ["\U0001F600" * migrated.max_text_chars] * 256
    body = json.dumps({**SMALL, "texts": texts}).encode()
    assert len(body) > 12_000_000
    r = client.post(ABLATE, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 201, r.text[:300]


@pytest.fixture
def live(migrated, synthetic_run):
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(migrated.model_copy(update={"max_body_bytes": 10_000})),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield port
    server.should_exit = True
    thread.join(timeout=5)


def test_a_chunked_upload_is_cut_off_at_the_limit_on_a_real_server(live, migrated):
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
    chunks = (b'{"features": [1], "mode": "zero", "texts": ["' if i == 0 else b"x" * 1000 for i in range(50))
    conn.request("POST", ABLATE, body=chunks, headers={"content-type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "RA_MAX_BODY_BYTES" in json.loads(r.read())["detail"]
    assert jobs.recent(migrated) == []
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", live, timeout=30)
    conn.request("GET", "/api/runs")
    assert conn.getresponse().status == 200  # the server goes on serving


# --- headers on every response; pages without inline script ---

def assert_security_headers(r, what):
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, what
    script = re.search(r"script-src ([^;]*)", csp).group(1)
    assert "'unsafe-inline'" not in script, what
    assert r.headers.get("x-content-type-options") == "nosniff", what
    assert r.headers.get("x-frame-options") == "DENY", what
    assert r.headers.get("referrer-policy") == "same-origin", what


def test_every_response_carries_the_security_headers(migrated, synthetic_run):
    with make_client(migrated.model_copy(update={"max_body_bytes": 1000})) as c:
        answers = {
            "html": c.get(RUN), "json": c.get("/api/runs"), "static": c.get("/static/style.css"),
            "404 page": c.get("/runs/nope"), "404 json": c.get("/api/runs/nope"),
            "422": c.get(f"/api{RUN}/layers/3", params={"page": 0}),
            "redirect": c.get(f"{RUN}/layers/3", params={"go": 12}, follow_redirects=False),
            "400 host": c.get("/", headers={"host": "evil.example"}),
            "403 origin": c.post(ABLATE, json=SMALL, headers={"origin": "http://evil.example"}),
            "413": c.post(ABLATE, content=b"x" * 2000), "403 csrf": c.post("/jobs/1/cancel", data={}),
        }
    with make_client(migrated.model_copy(update={"host": "0.0.0.0", "token": "s3cret"})) as c:
        answers["login redirect"] = c.get(RUN, follow_redirects=False)
        answers["401"] = c.get("/api/runs")
    app = create_app(migrated)

    @app.get("/boom")
    def boom():
        raise RuntimeError("an unhandled error")

    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        answers["500"] = c.get("/boom")
    statuses = {what: r.status_code for what, r in answers.items()}
    assert statuses == {"html": 200, "json": 200, "static": 200, "404 page": 404, "404 json": 404, "422": 422,
                        "redirect": 303, "400 host": 400, "403 origin": 403, "413": 413, "403 csrf": 403,
                        "login redirect": 303, "401": 401, "500": 500}
    for what, r in answers.items():
        assert_security_headers(r, what)


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
HANDLER_ATTRIBUTE = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)


def test_pages_have_no_inline_script_or_handler_the_policy_would_block(client, migrated):
    r = client.post(ABLATE, json=SMALL)
    job_id = r.json()["id"]
    pages = [RUN, f"{RUN}/layers/3", f"{RUN}/layers/3/features/{CONTEXT_FEATURE}", "/jobs", f"/jobs/{job_id}", "/login", "/"]
    for path in pages:
        page = client.get(path)
        assert page.status_code == 200, path
        assert not INLINE_SCRIPT.search(page.text), (path, INLINE_SCRIPT.search(page.text).group(0))
        assert not HANDLER_ATTRIBUTE.search(page.text), path
        assert "javascript:" not in page.text, path
    # the scripts the pages name are served from /static
    scripts = set(re.findall(r'<script src="([^"]+)"', "".join(client.get(p).text for p in pages)))
    assert {"/static/jobs.js", "/static/layer.js", "/static/feature.js", "/static/ablate.js"} <= scripts
    for src in scripts:
        assert client.get(src).status_code == 200 and "javascript" in client.get(src).headers["content-type"]


# --- in a real browser: the pages work under the policy ---

def test_pages_run_their_scripts_and_styles_under_the_policy_in_a_browser(live_server, page, migrated):  # noqa: F811
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{live_server}/runs/synthetic/layers/3/features/{CONTEXT_FEATURE}")
    # token shading is a style attribute (--a), which the policy allows
    shade = page.locator(".tok.peak").first.evaluate("t => getComputedStyle(t).getPropertyValue('--a')")
    assert shade.strip() == "100%"
    page.goto(f"{live_server}/runs/synthetic/layers/3")
    page.keyboard.press("/")  # layer.js, from /static
    assert page.evaluate("document.activeElement.id") == "token-search"
    page.locator("table.features input[type=checkbox][name=features]").first.check()  # ablate.js
    assert page.locator("#ablate-form select[name=selection]").input_value() == ""
    job = httpx.post(f"{live_server}/api/runs/synthetic/layers/3/ablations", json=SMALL).json()
    with page.expect_request(f"**/api/jobs/{job['id']}") as polled:  # jobs.js, started by its data-watch
        page.goto(f"{live_server}/jobs/{job['id']}")
    assert polled.value.method == "GET"
    assert violations == []
