"""Who may log in and whom a label or job names: the author comes from the credential, logging
out ends the session for every copy of its cookie, credentials in any characters are compared
(never a 500), and settings that would leave the server open or unusable are refused at start."""
from __future__ import annotations

import base64
import re

import pytest
import sqlalchemy as sa

from backend.core import db, jobs
from backend.web.access import AccessConfigError, check_serving_is_safe
from backend.core.models import WebSession
from tests.helpers import make_client

RUN = "/runs/synthetic"
ABLATE = f"/api{RUN}/layers/3/ablations"


def csrf(client, path="/login"):
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def login(client, user, password):
    return client.post("/login", data={"csrf_token": csrf(client), "user": user, "password": password},
                       follow_redirects=False)


def shared(settings, **update):
    return settings.model_copy(update={"host": "0.0.0.0", **update})


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def web_sessions(settings) -> list[str]:
    with db.get_engine(settings).connect() as conn:
        return list(conn.execute(sa.select(WebSession.author)).scalars())


# --- the author is the credential's ---

def test_the_shared_token_is_one_author_whatever_user_name_is_typed(migrated, synthetic_run):
    with make_client(shared(migrated, token="s3cret")) as c:
        page = c.get("/login").text
        assert "recorded as “token”" in page and "ignored" in page
        assert login(c, "alice", "s3cret").status_code == 303
        r = c.post(ABLATE, json={"features": [1], "mode": "zero"})
        assert r.status_code == 201 and r.json()["author"] == "token"
        # basic auth with the token and someone else's name: the token's author too
        r = c.post(ABLATE, json={"features": [2], "mode": "zero"}, headers=basic("x" * 5000, "s3cret"))
        assert r.status_code == 201 and r.json()["author"] == "token"
    assert sorted(j["author"] for j in jobs.recent(migrated)) == ["token", "token"]


def test_named_users_are_their_own_authors_and_the_token_beside_them_is_token(migrated, synthetic_run):
    with make_client(shared(migrated, token="s3cret", users="alice:wonder,bob:builder")) as c:
        assert login(c, "alice", "s3cret").status_code == 303  # alice's name, the token's password
        assert c.post(ABLATE, json={"features": [1], "mode": "zero"}).json()["author"] == "token"
        assert login(c, "bob", "wonder").status_code == 401  # alice's password is not bob's
        assert login(c, "bob", "builder").status_code == 303
        assert c.post(ABLATE, json={"features": [1], "mode": "zero"}).json()["author"] == "bob"


@pytest.mark.parametrize("users, message", [
    ("a" * 101 + ":pw", "at most 100"),
    ("token:pw", "reserved"),
    ("local:pw", "reserved"),
    ("alice", "name:password"),
])
def test_user_names_that_cannot_be_authors_are_refused_at_start(migrated, users, message):
    with pytest.raises(AccessConfigError, match=message):
        check_serving_is_safe(shared(migrated, users=users))
    check_serving_is_safe(shared(migrated, users="a" * 100 + ":pw"))  # the column's 100 characters fit


@pytest.mark.parametrize("token", [" ", "   ", "\t"])
def test_a_blank_token_is_refused_at_start(migrated, token):
    for host in ("0.0.0.0", "127.0.0.1"):
        with pytest.raises(AccessConfigError, match="RA_TOKEN is blank"):
            check_serving_is_safe(migrated.model_copy(update={"host": host, "token": token}))


# --- sessions end at logout ---

@pytest.mark.sql_databases
def test_logging_out_ends_the_session_for_every_copy_of_its_cookie(migrated, synthetic_run):
    settings = shared(migrated, users="alice:wonder", secret_key="one key for both clients' apps")
    with make_client(settings) as c:
        assert login(c, "alice", "wonder").status_code == 303
        assert web_sessions(migrated) == ["alice"]
        copied = dict(c.cookies)
        with make_client(settings) as thief:
            thief.cookies.update(copied)
            assert thief.get("/api/runs").status_code == 200  # the copy works while the session lasts
        logout = c.post("/logout", data={"csrf_token": csrf(c, "/")}, follow_redirects=False)
        assert logout.status_code == 303 and web_sessions(migrated) == []
        with make_client(settings) as thief:
            thief.cookies.update(copied)
            r = thief.get("/api/runs")
            assert r.status_code == 401 and "log in" in r.json()["detail"]
            assert thief.get(RUN, follow_redirects=False).headers["location"].startswith("/login")
        # logging in again makes a new session; the old cookie stays dead
        assert login(c, "alice", "wonder").status_code == 303 and c.get("/api/runs").status_code == 200
        assert web_sessions(migrated) == ["alice"]


def test_scripts_with_a_header_need_no_session(migrated, synthetic_run):
    with make_client(shared(migrated, token="s3cret")) as c:
        assert c.get("/api/runs", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert web_sessions(migrated) == []


@pytest.mark.parametrize("secure", [True, False])
def test_the_session_cookie_is_secure_when_set(migrated, synthetic_run, secure):
    with make_client(shared(migrated, users="alice:wonder", cookie_secure=secure)) as c:
        c.base_url = "https://127.0.0.1"  # a client sends a Secure cookie back over https only
        cookie = login(c, "alice", "wonder").headers["set-cookie"]
        assert cookie.startswith("rewardatlas_session=") and "httponly" in cookie.lower()
        assert ("secure" in cookie.lower()) is secure


# --- credentials in any characters: compared, never a 500 ---

def test_non_ascii_passwords_tokens_and_csrf_tokens_are_compared_not_a_500(migrated, synthetic_run):
    with make_client(shared(migrated, token="tökén", users="jürgen:pässwört")) as c:
        wrong = login(c, "jürgen", "pässwort")
        assert wrong.status_code == 401 and "wrong user name or password" in wrong.text
        assert login(c, "jürgen", "pässwört").status_code == 303
        assert c.post(ABLATE, json={"features": [1], "mode": "zero"}).json()["author"] == "jürgen"
        forged = c.post("/logout", data={"csrf_token": "ça"}, follow_redirects=False)
        assert forged.status_code == 403 and "CSRF" in forged.text
    with make_client(shared(migrated, token="tökén")) as c:
        assert login(c, "", "tökén").status_code == 303
    with make_client(shared(migrated, token="s3cret")) as c:
        r = c.get("/api/runs", headers={"authorization": "Bearer tökén".encode("latin-1")})
        assert r.status_code == 401 and "authentication required" in r.json()["detail"]
        r = c.get("/api/runs", headers={"authorization": "Bearer ⚡".encode()})
        assert r.status_code == 401


@pytest.mark.parametrize("value", ["Basic !!!not base64", "Basic " + base64.b64encode(b"\xff\xfe:s3cret").decode(),
                                   "Basic " + base64.b64encode("alice:s3crét".encode()).decode(), "Basic ", "Basic"])
def test_basic_auth_that_is_not_base64_utf8_or_right_is_401(migrated, synthetic_run, value):
    with make_client(shared(migrated, token="s3cret")) as c:
        r = c.get("/api/runs", headers={"authorization": value})
        assert r.status_code == 401 and "authentication required" in r.json()["detail"]
        assert c.get("/api/runs", headers=basic("alice", "s3cret")).status_code == 200
