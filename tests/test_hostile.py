"""Hand-made hostile requests, each replayed against the app on the synthetic run, on SQLite and
on PostgreSQL: none may be a 500, every refusal is a 4xx whose body names the problem, and a
refused write changes nothing (no job queued, no label written).

The cases are built per family below (ids, numbers, strings, forms, bodies, queries, headers,
methods), so a new route or field joins by adding one line to a family."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

import yaml

from backend.core import jobs, labels
from tests.conftest import SQL_DATABASES
from tests.helpers import DEAD_FEATURE, LAYERS, N_FEATURES, make_client

pytestmark = pytest.mark.sql_databases  # the tests on `client` too, on both databases

RUN = "/api/runs/synthetic"
LAYER = LAYERS[0]
FEATURE = f"{RUN}/layers/{LAYER}/features/7"
ABLATE = f"{RUN}/layers/{LAYER}/ablations"
TEXT = f"{RUN}/layers/{LAYER}/texts"


@dataclass
class Case:
    id: str
    method: str
    url: str
    expect: tuple[int, ...]
    json: Any = None
    content: bytes | str | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    says: str | None = None  # a word the refusal's message must contain


def _raw(body: str, **kw) -> dict:
    return {"content": body, "headers": {"content-type": "application/json", **kw.pop("headers", {})}, **kw}


# --- ids in paths: out of range, not ASCII digits, not numbers ---------------------------------

BAD_IDS = ["-1", "2147483648", "4294967296", "4294967303", "9223372036854775808", "18446744073709551617",
           "1" * 400, "1e3", "0x10", "7.0", "²", "١٢", "𝟙", "½", "%20", "nan", "inf", "true", "[]"]

ID_ROUTES = {  # route template -> expected statuses for a bad id
    "GET {run}/layers/{id}": (404, 422),
    "GET {run}/layers/{id}/faithfulness": (404, 422),
    "GET {run}/layers/{layer}/features/{id}": (404, 422),
    "GET {run}/layers/{id}/features/7": (404, 422),
    "GET {run}/layers/{layer}/features/{id}/label": (404, 422),
    "GET /api/jobs/{id}": (404, 422),
    "GET /runs/synthetic/layers/{id}": (404, 422),
    "GET /runs/synthetic/layers/{layer}/features/{id}": (404, 422),
    "GET /jobs/{id}": (404, 422),
}


def _id_cases() -> list[Case]:
    cases = []
    for route, expect in ID_ROUTES.items():
        method, template = route.split(" ")
        for bad in BAD_IDS:
            url = template.format(run=RUN, layer=LAYER, id=bad)
            cases.append(Case(f"{route}:{bad[:12]}", method, url, expect))
    for bad in BAD_IDS[:8]:
        cases.append(Case(f"PUT label feature {bad[:12]}", "PUT", f"{RUN}/layers/{LAYER}/features/{bad}/label",
                          (404, 422), json={"label": "reward", "note": "", "version": 0}))
        cases.append(Case(f"cancel job {bad[:12]}", "POST", f"/api/jobs/{bad}/cancel", (404, 422)))
        cases.append(Case(f"ablate layer {bad[:12]}", "POST", f"{RUN}/layers/{bad}/ablations", (404, 422),
                          json={"mode": "zero", "features": [1]}))
    return cases


# --- numbers a JSON parser accepts and a store or model cannot ---------------------------------

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e309", "-1e309", "1" * 5000]


def _number_cases() -> list[Case]:
    cases = []
    bodies = {
        "ablate value": (ABLATE, '{{"mode": "steer", "value": {x}, "features": [1]}}'),
        "ablate clamp": (ABLATE, '{{"mode": "clamp", "value": {x}, "features": [1]}}'),
        "ablate top_n": (ABLATE, '{{"mode": "zero", "selection": "top_ranked", "top_n": {x}}}'),
        "ablate n_texts": (ABLATE, '{{"mode": "zero", "features": [1], "n_texts": {x}}}'),
        "ablate feature": (ABLATE, '{{"mode": "zero", "features": [{x}]}}'),
        "text edit value": (TEXT, '{{"text": "good film", "edit": {{"mode": "steer", "value": {x}, "features": [1]}}}}'),
        "text feature": (TEXT, '{{"text": "good film", "features": [{x}]}}'),
        "label version": (f"{FEATURE}/label", '{{"label": "reward", "note": "", "version": {x}}}'),
    }
    for name, (url, body) in bodies.items():
        method = "PUT" if url.endswith("/label") else "POST"
        for x in NON_FINITE:
            cases.append(Case(f"{name} {x[:10]}", method, url, (422,), **_raw(body.format(x=x))))
    # finite, but beyond what an edit can take without overflowing the residual stream
    for x in ["1e5", "1e30", "1.7e308", "-1e300"]:
        cases.append(Case(f"steer {x}", "POST", ABLATE, (422,), json={"mode": "steer", "value": float(x),
                                                                        "features": [1]}, says="value"))
        cases.append(Case(f"clamp {x}", "POST", TEXT, (422,), json={
            "text": "good film", "edit": {"mode": "clamp", "value": float(x), "features": [1]}}, says="value"))
    for x in [2**31, 2**32 + 7, 2**63, 2**64 + 1, -1, -(2**63)]:
        cases.append(Case(f"feature id {x}", "POST", ABLATE, (422,), json={"mode": "zero", "features": [x]}))
        cases.append(Case(f"shown id {x}", "POST", TEXT, (422,), json={"text": "good film", "features": [x]}))
        cases.append(Case(f"label version {x}", "PUT", f"{FEATURE}/label", (409, 422),
                          json={"label": "reward", "note": "", "version": x}))
    return cases


# --- strings that are not valid Unicode, or too long ------------------------------------------

SURROGATES = ["\\ud800", "\\udfff", "a\\ud83dz", "\\udc00\\ud800"]


def _string_cases() -> list[Case]:
    cases = []
    bodies = {
        "note": (f"{FEATURE}/label", '{{"label": "reward", "note": "{s}", "version": 0}}', "PUT"),
        "label": (f"{FEATURE}/label", '{{"label": "{s}", "note": "", "version": 0}}', "PUT"),
        "text": (TEXT, '{{"text": "{s}"}}', "POST"),
        "typed texts": (ABLATE, '{{"mode": "zero", "features": [1], "texts": ["{s}"]}}', "POST"),
        "mode": (ABLATE, '{{"mode": "{s}", "features": [1]}}', "POST"),
        "selection": (ABLATE, '{{"mode": "zero", "selection": "{s}"}}', "POST"),
        "config": ("/api/jobs", '{{"config_yaml": "name: {s}"}}', "POST"),
        "key": (ABLATE, '{{"{s}": 1, "mode": "zero", "features": [1]}}', "POST"),
    }
    for name, (url, body, method) in bodies.items():
        for s in SURROGATES:
            cases.append(Case(f"surrogate {name} {s}", method, url, (422,), **_raw(body.format(s=s))))
    long = "x" * 5000
    cases += [
        Case("note too long", "PUT", f"{FEATURE}/label", (422,), json={"label": "reward", "note": long * 2,
                                                                        "version": 0}, says="note"),
        Case("text too long", "POST", TEXT, (422,), json={"text": long}, says="characters"),
        Case("typed text too long", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1], "texts": [long]}),
        Case("too many typed texts", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1],
                                                                    "texts": ["a"] * 300}),
        Case("blank text", "POST", TEXT, (422,), json={"text": "   \n\t "}),
        Case("empty text", "POST", TEXT, (422,), json={"text": ""}),
        Case("blank typed texts", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1], "texts": [" ", ""]}),
        Case("config not yaml", "POST", "/api/jobs", (422,), json={"config_yaml": "a: [1, 2"}, says="config"),
        Case("config a list", "POST", "/api/jobs", (422,), json={"config_yaml": "- 1\n- 2"}, says="config"),
        Case("config a number", "POST", "/api/jobs", (422,), json={"config_yaml": "0"}, says="config"),
        Case("config too long", "POST", "/api/jobs", (413, 422), json={"config_yaml": "#" * 200_000}),
        Case("config empty", "POST", "/api/jobs", (422,), json={"config_yaml": ""}),
        Case("config null bytes", "POST", "/api/jobs", (422,), json={"config_yaml": "name: a\x00b"}),
    ]
    return cases


# --- feature lists: too many, duplicated, out of the layer ------------------------------------

def _list_cases() -> list[Case]:
    return [
        Case("5000 features", "POST", ABLATE, (422,), json={"mode": "zero", "features": list(range(5000))}),
        Case("features beyond width", "POST", ABLATE, (422,), json={"mode": "zero", "features": [N_FEATURES]},
             says="out of range"),
        Case("33 shown features", "POST", TEXT, (422,), json={"text": "good", "features": list(range(33))}),
        Case("shown beyond width", "POST", TEXT, (422,), json={"text": "good", "features": [N_FEATURES + 1]}),
        Case("no features", "POST", ABLATE, (422,), json={"mode": "zero", "features": []}, says="no features"),
        Case("features a string", "POST", ABLATE, (422,), json={"mode": "zero", "features": "1,2"}),
        Case("features nested", "POST", ABLATE, (422,), json={"mode": "zero", "features": [[1]]}),
        Case("features floats", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1.5]}),
        Case("features bools", "POST", ABLATE, (201, 422), json={"mode": "zero", "features": [True]}),
        Case("unknown selection", "POST", ABLATE, (422,), json={"mode": "zero", "selection": "everything"}),
        Case("top_n 0", "POST", ABLATE, (422,), json={"mode": "zero", "selection": "top_ranked", "top_n": 0}),
        Case("top_n huge", "POST", ABLATE, (422,), json={"mode": "zero", "selection": "top_ranked", "top_n": 10**9}),
        Case("n_controls 2", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1], "n_controls": 2}),
        Case("n_texts 0", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1], "n_texts": 0}),
        Case("clamp without value", "POST", ABLATE, (422,), json={"mode": "clamp", "features": [1]}, says="value"),
        Case("unknown mode", "POST", ABLATE, (422,), json={"mode": "explode", "features": [1]}),
        Case("unknown tokens", "POST", ABLATE, (422,), json={"mode": "zero", "features": [1], "tokens": "some"}),
        # each control draw needs as many other features as are chosen
        Case("ablate half the layer and one", "POST", ABLATE, (422,), says="control",
             json={"mode": "zero", "features": list(range(N_FEATURES // 2 + 1))}),
        Case("ablate top 33 of 64", "POST", ABLATE, (422,), says="control",
             json={"mode": "zero", "selection": "top_abs", "top_n": N_FEATURES // 2 + 1}),
        Case("sweep half the layer and one", "POST", f"{RUN}/layers/{LAYER}/sweeps", (422,), says="control",
             json={"features": list(range(N_FEATURES // 2 + 1)), "mode": "steer"}),
        Case("15 MB of floats", "PUT", f"{FEATURE}/label", (422,), says="values",
             json={"label": "reward", "note": "", "version": [0.5] * 1_500_000}),
    ]


# --- forms: the feature lists people type -------------------------------------------------------

FORM_IDS = ["²", "١٢", "𝟙", "½", "1e3", "-1", "0x1", "99999999999", "1.5", "seven", "7;8", "4294967303"]


def _form_cases() -> list[Case]:
    cases = []
    for bad in FORM_IDS:
        cases.append(Case(f"ablate form features {bad}", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (422,),
                          data={"mode": "zero", "features": bad, "eval": "heldout"}, says="feature"))
        cases.append(Case(f"text form shown {bad}", "POST", f"/runs/synthetic/layers/{LAYER}/text", (422,),
                          data={"text": "good film", "shown": bad}, says="feature"))
    cases += [
        Case("ablate form 5000 ids", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (422,),
             data={"mode": "zero", "features": ",".join(map(str, range(5000)))}),
        Case("text form 40 shown", "POST", f"/runs/synthetic/layers/{LAYER}/text", (422,),
             data={"text": "good", "shown": " ".join(map(str, range(40)))}),
        Case("ablate form steer 1e300", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (422,),
             data={"mode": "steer", "value": "1e300", "features": "1"}),
        Case("ablate form steer nan", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (422,),
             data={"mode": "steer", "value": "nan", "features": "1"}),
        Case("ablate form top_n text", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (422,),
             data={"mode": "zero", "selection": "top_ranked", "top_n": "ten"}),
        Case("label form version huge", "POST", f"/runs/synthetic/layers/{LAYER}/features/7/label", (422,),
             data={"label": "reward", "version": str(2**64)}),
        Case("label form version digits", "POST", f"/runs/synthetic/layers/{LAYER}/features/7/label", (422,),
             data={"label": "reward", "version": "²"}),
        Case("label form unknown label", "POST", f"/runs/synthetic/layers/{LAYER}/features/7/label", (422,),
             data={"label": "<script>", "version": "0"}),
        Case("pipeline form not yaml", "POST", "/jobs", (422,), data={"config_yaml": "a: [1"}),
        Case("pipeline form empty", "POST", "/jobs", (422,), data={"config_yaml": ""}),
    ]
    return cases


# --- bodies that are not what the route reads -----------------------------------------------------

def _body_cases() -> list[Case]:
    cases = []
    for url, method in ((ABLATE, "POST"), (TEXT, "POST"), ("/api/jobs", "POST"), (f"{FEATURE}/label", "PUT")):
        for name, body in {"truncated": '{"mode": "ze', "list": "[1, 2]", "string": '"zero"', "number": "7",
                           "null": "null", "empty object": "{}", "trailing": '{"mode": "zero"} x',
                           "deep": "[" * 100_000 + "]" * 100_000, "bytes": b"\xff\xfe\x00\x01",
                           "bom": "\ufeff{}", "huge int": '{"version": ' + "9" * 5000 + "}"}.items():
            cases.append(Case(f"{method} {url.rsplit('/', 1)[-1]} {name}", method, url, (400, 413, 422),
                              **_raw(body)))
        cases.append(Case(f"{url} 17 MB", method, url, (413,), **_raw('{"note": "' + "x" * 17_000_000 + '"}')))
        cases.append(Case(f"{url} text/plain", method, url, (403, 415, 422), content="{}",
                          headers={"content-type": "text/plain"}))
        cases.append(Case(f"{url} form-encoded", method, url, (403, 415, 422), content="mode=zero",
                          headers={"content-type": "application/x-www-form-urlencoded"}))
    return cases


# --- queries -----------------------------------------------------------------------------------------

def _query_cases() -> list[Case]:
    table = f"{RUN}/layers/{LAYER}"
    cases = [Case(f"jobs limit {x}", "GET", f"/api/jobs?limit={x}", (422,))
             for x in ["-1", "0", "501", "1e3", "ten", str(2**63), "²", "nan"]]
    for query in ["sort=bogus", "sort=;DROP TABLE features", "page=0", "page=-1", f"page={2**40}", "page=²",
                  "min_freq=nan", "min_freq=inf", "min_freq=-1", "max_freq=200", "min_freq=0.5&max_freq=0.1",
                  "label=bogus", "sign=up", "token=" + "a" * 1000, "page=99999"]:
        for base in (table, f"/runs/synthetic/layers/{LAYER}", f"{FEATURE}"):
            # a feature page reads the view only for j/k: a page beyond the table's is no error there
            ok = (200,) if base == FEATURE and query == "page=99999" else ()
            cases.append(Case(f"{base} {query[:20]}", "GET", f"{base}?{query}", (404, 422, *ok)))
    cases += [Case(f"go {x}", "GET", f"/runs/synthetic/layers/{LAYER}?go={x}", (404, 422))
              for x in ["-1", str(2**31), str(2**40), "²", str(N_FEATURES)]]
    cases += [Case(f"run id {name}", "GET", f"/api/runs/{rid}", (404,))
              for name, rid in {"traversal": "..%2F..%2Fetc", "long": "r" * 5000, "quote": "%27%22",
                                "unicode": "%E2%80%AE"}.items()]
    return cases


# --- NUL: PostgreSQL's text cannot hold it; refused at the edge on both databases ----------------

def _nul_cases() -> list[Case]:
    cases = [Case(f"nul {method} {url}", method, url, (422,), says="NUL")
             for method, url in [("GET", "/api/runs/l%00r"), ("GET", "/api/runs/%00"), ("DELETE", "/api/runs/l%00r"),
                                 ("GET", "/api/runs/l%00r/labels.csv"), ("GET", "/runs/l%00r/layers/1"),
                                 ("GET", f"{RUN}/layers/{LAYER}?token=a%00b"), ("GET", f"{RUN}/texts?q=%00"),
                                 ("GET", f"{FEATURE}/label?x=%00")]]
    cases += [
        Case("nul in a label note", "PUT", f"{FEATURE}/label", (422,), says="NUL",
             **_raw('{"label": "reward", "note": "a\\u0000b", "version": 0}')),
        Case("nul in a key", "POST", ABLATE, (422,), says="NUL", **_raw('{"mode": "zero", "features": [1], "\\u0000": 1}')),
        Case("nul in a typed text", "POST", TEXT, (422,), says="NUL", json={"text": "good\x00 film"}),
        Case("nul in a form note", "POST", f"/runs/synthetic/layers/{LAYER}/features/7/label", (422,), says="NUL",
             data={"label": "reward", "note": "a\x00b", "version": "0"}),
        Case("nul in a config's name", "POST", "/api/jobs", (422,), says="NUL",
             json={"config_yaml": 'name: "a\\0b"\nmodel: {path: demo}\ndataset: {source: demo}\nlayers: [1]'}),
    ]
    return cases


# --- run configs: every key that names a path, every limit -----------------------------------------

def _config(**changes) -> str:
    return yaml.safe_dump({"name": "hostile", "model": {"path": "demo"}, "dataset": {"source": "demo"},
                           "layers": [1], **changes})


def _config_cases() -> list[Case]:
    paths = {  # every key that names something to read, pointed outside the input folders
        "hf absolute": ({"dataset": {"source": "hf:/etc"}}, "dataset.source"),
        "hf parent": ({"dataset": {"source": "hf:../../etc/passwd"}}, "dataset.source"),
        "hf home": ({"dataset": {"source": "hf:~/.ssh"}}, "dataset.source"),
        "dataset file": ({"dataset": {"source": "/etc/passwd"}}, "dataset.source"),
        "model dir": ({"model": {"path": "/etc"}}, "model.path"),
        "lexicon environ": ({"lexicon": {"reference": "/proc/self/environ"}}, "lexicon.reference"),
        "lexicon csv": ({"lexicon": {"reference": "../../../../etc/passwd"}}, "lexicon.reference"),
        "vocabulary environ": ({"reason_score": {"vocabulary": "/proc/self/environ"}}, "reason_score.vocabulary"),
        "vocabulary missing": ({"reason_score": {"vocabulary": "/nonexistent/words.txt"}}, "reason_score.vocabulary"),
        "base model": ({"transfer": {"base_model": "/usr"}}, "transfer.base_model"),
        "base model parent": ({"transfer": {"base_model": "../../../../usr/lib"}}, "transfer.base_model"),
    }
    cases = [Case(f"config path {name}", "POST", "/api/jobs", (422,), json={"config_yaml": _config(**changes)},
                  says=key) for name, (changes, key) in paths.items()]
    limits = {  # every key the probe found unbounded, each far beyond
        "transfer.training_tokens": {"transfer": {"base_model": "demo-base", "training_tokens": 10**15}},
        "sae.buffer_tokens": {"sae": {"buffer_tokens": 10**12}},
        "sae.batch_size": {"sae": {"batch_size": 10**12}},
        "dataset.batch_size": {"dataset": {"source": "demo", "batch_size": 10**12}},
        "analysis.window_before": {"analysis": {"window_before": 10**9}},
        "effects.pool_texts": {"effects": {"pool_texts": 10**12}},
        "effects.faithfulness_texts": {"effects": {"faithfulness_texts": 10**12}},
        "lexicon.batch_size": {"lexicon": {"batch_size": 10**12}},
        "transfer.match_tokens": {"transfer": {"base_model": "demo-base", "match_tokens": 10**15}},
        "sae.dead_feature_window": {"sae": {"dead_feature_window": 10**15}},
        "seed": {"seed": 10**30},
    }
    cases += [Case(f"config limit {key}", "POST", "/api/jobs", (422,), json={"config_yaml": _config(**changes)},
                   says=key) for key, changes in limits.items()]
    return cases


# --- hosts, origins, methods -------------------------------------------------------------------------

def _header_cases() -> list[Case]:
    cases = [Case(f"host {h}", "GET", "/api/runs", (400,), headers={"host": h}, says="host")
             for h in ["evil.example", "127.0.0.1.evil.example", "localhost.evil.example", "[::2]", "10.0.0.1"]]
    for origin in ["http://evil.example", "null", "http://127.0.0.1.evil.example", "https://localhost.evil.example",
                   "http://127.0.0.1:9999", "http://localhost:9999", "https://127.0.0.1", "http://[::1]:8000"]:
        cases.append(Case(f"origin {origin} label", "PUT", f"{FEATURE}/label", (403,),
                          json={"label": "reward", "note": "", "version": 0}, headers={"origin": origin}))
        cases.append(Case(f"origin {origin} ablate", "POST", ABLATE, (403,),
                          json={"mode": "zero", "features": [1]}, headers={"origin": origin}))
        cases.append(Case(f"origin {origin} form", "POST", f"/runs/synthetic/layers/{LAYER}/ablate", (403,),
                          data={"mode": "zero", "features": "1"}, headers={"origin": origin}))
        cases.append(Case(f"origin {origin} cancel", "POST", "/api/jobs/1/cancel", (403,), headers={"origin": origin}))
    cases.append(Case("referer elsewhere", "POST", "/api/jobs", (403,), json={"config_yaml": "name: x"},
                      headers={"referer": "http://evil.example/page"}))
    for method, url in [("PATCH", f"{FEATURE}/label"), ("DELETE", f"{FEATURE}/label"), ("PUT", "/api/jobs"),
                        ("DELETE", "/api/jobs"), ("POST", f"{RUN}/layers/{LAYER}"), ("PUT", ABLATE)]:
        cases.append(Case(f"{method} {url}", method, url, (405,)))
    return cases


CASES = (_id_cases() + _number_cases() + _string_cases() + _list_cases() + _form_cases() + _body_cases()
         + _query_cases() + _header_cases() + _nul_cases() + _config_cases())


def test_there_are_at_least_300_hostile_requests():
    assert len(CASES) >= 300, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES), "case ids repeat"


@pytest.fixture(scope="module", params=SQL_DATABASES)
def hostile_app(request, tmp_path_factory):
    import contextlib

    from backend.core import db
    from backend.core.settings import Settings

    with (request.getfixturevalue("postgres_server").database() if request.param == "postgresql"
          else contextlib.nullcontext("")) as database_url:
        yield from _hostile_app(Settings(data_dir=tmp_path_factory.mktemp("hostile"), database_url=database_url))
        db.dispose_engines()


def _hostile_app(settings):
    from backend.core import db
    from tests.helpers import publish_synthetic_run

    db.upgrade(settings)
    publish_synthetic_run(settings)
    with make_client(settings) as client:
        # forms carry the session's CSRF token: fetch it once, as a browser would from the page
        page = client.get(f"/runs/synthetic/layers/{LAYER}/features/7")
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        yield client, settings, token
    db.dispose_engines()


def _message(response) -> str:
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        assert detail, f"a refusal without a message: {body}"
        return detail if isinstance(detail, str) else " ".join(f"{e['loc']} {e['msg']}" for e in detail)
    return response.text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_is_refused_with_a_message_and_changes_nothing(hostile_app, case):
    client, settings, token = hostile_app
    before_jobs = len(jobs.recent(settings, 10_000))
    before_label = labels.current(settings, "synthetic", LAYER, 7)
    data = {**case.data, "csrf_token": token} if case.data is not None else None
    response = client.request(case.method, case.url, json=case.json, content=case.content, data=data,
                              headers=case.headers, follow_redirects=False)
    assert response.status_code in case.expect, (response.status_code, response.text[:500])
    message = _message(response) if response.status_code >= 400 else ""
    if case.says:
        assert case.says.lower() in message.lower(), message[:500]
    if response.status_code == 405:
        assert response.headers.get("allow"), "a 405 names the methods the path serves"
    if response.status_code >= 400:
        assert len(jobs.recent(settings, 10_000)) == before_jobs, "a refused request queued a job"
        assert labels.current(settings, "synthetic", LAYER, 7) == before_label, "a refused request wrote a label"
    json.dumps(response.text)  # whatever came back is text that can be shown


def test_a_huge_feature_id_never_answers_with_another_layers_feature(client):
    """The store's card key packs layer and feature into 64 bits: 2**32 + 7 would have read
    layer 4's... or this layer's feature 7. It is refused at the edge instead."""
    for fid in (2**32 + 7, 2**33 + 7, (LAYERS[1] - LAYERS[0]) * 2**32 + 7):
        response = client.get(f"{RUN}/layers/{LAYER}/features/{fid}")
        assert response.status_code in (404, 422), response.text[:200]


def test_nan_in_a_body_comes_back_as_a_readable_422(client):
    response = client.post(ABLATE, **_raw('{"mode": "steer", "value": NaN, "features": [1]}'))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][0] == "body" and "finite" in detail[0]["msg"]


def test_form_feature_lists_are_deduplicated(client):
    page = client.get(f"/runs/synthetic/layers/{LAYER}")
    token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    response = client.post(f"/runs/synthetic/layers/{LAYER}/text", follow_redirects=False,
                           data={"text": "good film", "shown": "3 3, 4 3 4", "csrf_token": token})
    assert response.status_code == 303
    job_id = int(response.headers["location"].rsplit("/", 1)[1])
    assert client.get(f"/api/jobs/{job_id}").json()["params"]["features"] == [3, 4]


def test_csv_export_escapes_formulas(client):
    for feature, note in ((1, "=cmd|' /C calc'!A0"), (2, "+1+1"), (3, "-2+3"), (4, "@SUM(A1)"), (5, "plain")):
        r = client.put(f"{RUN}/layers/{LAYER}/features/{feature}/label",
                       json={"label": "reward", "note": note, "version": 0})
        assert r.status_code == 200, r.text
    rows = list(csv.DictReader(io.StringIO(client.get(f"{RUN}/labels.csv").text)))
    notes = {int(r["feature"]): r["note"] for r in rows}
    assert notes == {1: "'=cmd|' /C calc'!A0", 2: "'+1+1", 3: "'-2+3", 4: "'@SUM(A1)", 5: "plain"}
    # the JSON export is data, not a spreadsheet: it keeps the note as typed
    assert {r["feature"]: r["note"] for r in client.get(f"{RUN}/labels.json").json()}[1] == "=cmd|' /C calc'!A0"


def test_the_dead_feature_is_still_a_feature(client):
    assert client.get(f"{RUN}/layers/{LAYER}/features/{DEAD_FEATURE}").status_code == 200


def test_an_ablation_of_the_labelled_features_names_them(client):
    """selection labelled_reward has no ranking to describe: it once failed with a 500."""
    none = client.post(ABLATE, json={"mode": "zero", "selection": "labelled_reward"})
    assert none.status_code == 422 and "no features selected" in none.text
    for feature in (9, 4):
        assert client.put(f"{RUN}/layers/{LAYER}/features/{feature}/label",
                          json={"label": "reward", "note": "", "version": 0}).status_code == 200
    queued = client.post(ABLATE, json={"mode": "zero", "selection": "labelled_reward"})
    assert queued.status_code == 201, queued.text
    assert queued.headers["location"] == f"/api/jobs/{queued.json()['id']}"
    assert queued.json()["params"]["features"] == [4, 9]
    assert "labelled reward-related" in queued.json()["params"]["described"]


def _basic(user: str, password: str) -> dict:
    import base64

    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_with_named_users_only_a_jobs_author_may_cancel_it(migrated, synthetic_run):
    """alice's browser once cancelled bob's job: cancel checked no one."""
    users = migrated.model_copy(update={"users": "alice:pa55,bob:pa55"})
    alice, bob = _basic("alice", "pa55"), _basic("bob", "pa55")
    with make_client(users) as client:
        job = client.post(ABLATE, json={"mode": "zero", "features": [1]}, headers=bob)
        assert job.status_code == 201, job.text
        cancel = f"/api/jobs/{job.json()['id']}/cancel"
        refused = client.post(cancel, headers=alice)
        assert refused.status_code == 403 and "only its author" in refused.json()["detail"]
        assert jobs.get(users, job.json()["id"])["status"] == "queued"
        assert client.post(cancel, headers=bob).json()["status"] == "cancelled"


def test_a_config_pointing_outside_the_input_folders_echoes_nothing_it_names(client, migrated, tmp_path_factory,
                                                                           monkeypatch):
    secret_dir = tmp_path_factory.mktemp("elsewhere")  # beside the data dir, not in it
    (secret_dir / "lexicon.csv").write_text("word,value\npassword,S3cr3tP4ssw0rd!\n")
    (secret_dir / "words.txt").write_text("hunter2\n")
    monkeypatch.setenv("RA_PROBE_SECRET", "environ-S3cr3t")
    for changes in ({"lexicon": {"reference": "/proc/self/environ"}},
                    {"reason_score": {"vocabulary": "/proc/self/environ"}},
                    {"lexicon": {"reference": str(secret_dir / "lexicon.csv")}},
                    {"reason_score": {"vocabulary": str(secret_dir / "words.txt")}},
                    {"reason_score": {"vocabulary": str(secret_dir / "absent.txt")}},
                    {"dataset": {"source": f"hf:{secret_dir}"}}):
        response = client.post("/api/jobs", json={"config_yaml": _config(**changes)})
        assert response.status_code == 422, response.text
        for leaked in ("S3cr3t", "hunter2", "PATH=", "not found", "line"):
            assert leaked not in response.text, response.text
    assert jobs.recent(migrated) == []


def test_a_model_folder_without_a_tokenizer_is_refused_at_submission(client, migrated):
    base = migrated.data_dir / "models" / "no-tokenizer"
    base.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "bert", "num_hidden_layers": 6}')
    response = client.post("/api/jobs", json={"config_yaml": _config(transfer={"base_model": str(base)})})
    assert response.status_code == 422 and "no tokenizer" in response.text, response.text
    assert jobs.recent(migrated) == []


def test_half_the_layer_may_be_ablated_with_controls_and_more_without(client):
    half = client.post(ABLATE, json={"mode": "zero", "features": list(range(N_FEATURES // 2))})
    assert half.status_code == 201, half.text
    more = client.post(ABLATE, json={"mode": "zero", "features": list(range(N_FEATURES // 2 + 1)), "control": False})
    assert more.status_code == 201, more.text


def test_a_large_body_within_the_value_limit_is_read_in_another_process_and_served(client):
    """256 typed texts of 4,000 characters: over the size parsed inline, a few hundred values."""
    texts = [("fine film " * 400)[:4000] + str(i) for i in range(256)]
    queued = client.post(ABLATE, json={"mode": "zero", "features": [1], "texts": texts})
    assert queued.status_code == 422 and "characters" in queued.text  # 4,001 characters: the route's own rule
    texts = [t[:3999] for t in texts]
    queued = client.post(ABLATE, json={"mode": "zero", "features": [1], "texts": texts})
    assert queued.status_code == 201, queued.text[:500]
    assert len(queued.json()["params"]["texts"]) == 256
