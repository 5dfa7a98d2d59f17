"""Feature labels: set, clear, history, refused stale edits, filters, exports, and no lost
updates under concurrent writers."""
from __future__ import annotations

import csv
import io
import re
import threading

import httpx
import pytest
import sqlalchemy as sa

from backend.core import db, labels
from backend.core.models import LABELS, LabelEvent
from tests.helpers import N_FEATURES, make_client
from tests.test_browser import live_server  # noqa: F401  (a fixture: one real uvicorn server)

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

RUN = "/runs/synthetic"
FEATURE = f"{RUN}/layers/3/features"
# what a label was made on: the synthetic run's SAEs have no weights file, so no fingerprint
MADE_ON_THIS_RUN = {"run_version": 1, "sae_fingerprint": None, "made_on_current_sae": True}
NO_LABEL_MADE_ON = dict.fromkeys(MADE_ON_THIS_RUN)


def api(feature: int, layer: int = 3) -> str:
    return f"/api{RUN}/layers/{layer}/features/{feature}/label"


def csrf(client, path: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def n_events(settings) -> int:
    with db.session(settings) as s:
        return s.scalar(sa.select(sa.func.count()).select_from(LabelEvent))


def test_set_read_and_clear_a_label(client):
    assert client.get(api(5)).json() | {"history": None} == {
        "run_id": "synthetic", "layer": 3, "feature": 5, "label": None, "note": "", "author": None,
        "updated_at": None, "version": 0, "history": None, "orphaned": False, **NO_LABEL_MADE_ON}
    r = client.put(api(5), json={"label": "reward", "note": "fires on praise", "version": 0})
    assert r.status_code == 200
    assert r.json() | {"updated_at": None} == {"run_id": "synthetic", "layer": 3, "feature": 5, "label": "reward",
                                               "note": "fires on praise", "author": "local", "updated_at": None,
                                               "version": 1, **MADE_ON_THIS_RUN}
    page = client.get(f"/api{FEATURE}/5").json()
    assert page["label"]["label"] == "reward" and [e["new_label"] for e in page["label_history"]] == ["reward"]
    html = client.get(f"{FEATURE}/5").text
    assert 'id="current-label">reward-related<' in html and "fires on praise" in html

    cleared = client.put(api(5), json={"label": "", "note": "", "version": 1}).json()
    assert cleared["label"] is None and cleared["version"] == 2  # versions keep growing after a clear
    now = client.get(api(5)).json()
    assert now["label"] is None and now["version"] == 2 and now["author"] == "local"
    assert [(e["old_label"], e["new_label"]) for e in now["history"]] == [(None, "reward"), ("reward", None)]
    assert client.get(f"/api{RUN}/labels.json").json() == []  # a cleared label is no label


def test_history_keeps_every_change_with_its_author(migrated, synthetic_run):
    settings = migrated.model_copy(update={"users": "alice:a-pw,bob:b-pw"})  # same database, named users
    steps = [("alice", "reward", "praise"), ("bob", "unsure", "praise?"), ("alice", "not_reward", ""),
             ("bob", "", ""), ("alice", "reward", "back again")]
    with make_client(settings) as client:
        for version, (user, label, note) in enumerate(steps):
            r = client.put(api(9), json={"label": label, "note": note, "version": version},
                           auth=(user, f"{user[0]}-pw"))
            assert r.status_code == 200, r.text
            # the feature page's one-query read agrees with the label row after every change
            assert labels.current_and_history(settings, "synthetic", 3, 9) == (
                labels.current(settings, "synthetic", 3, 9), labels.history(settings, "synthetic", 3, 9))
        history = client.get(api(9), auth=("bob", "b-pw")).json()["history"]
    assert [(e["version"], e["author"], e["old_label"], e["new_label"]) for e in history] == [
        (1, "alice", None, "reward"), (2, "bob", "reward", "unsure"), (3, "alice", "unsure", "not_reward"),
        (4, "bob", "not_reward", None), (5, "alice", None, "reward")]
    assert [(e["old_note"], e["new_note"]) for e in history] == [
        (None, "praise"), ("praise", "praise?"), ("praise?", ""), ("", None), (None, "back again")]
    assert labels.current(settings, "synthetic", 3, 9)["author"] == "alice"
    assert labels.current_and_history(settings, "synthetic", 3, 10) == (labels.current(settings, "synthetic", 3, 10), [])


def test_stale_edit_is_refused_and_nothing_is_written(client, migrated):
    labels.set_label(migrated, "synthetic", 3, 4, "reward", "first", "alice", 0)
    before = n_events(migrated)
    r = client.put(api(4), json={"label": "not_reward", "note": "mine", "version": 0})
    assert r.status_code == 409
    assert "changed by alice to reward-related (version 1) since you loaded the page" in r.json()["detail"]
    assert r.json()["current"]["version"] == 1

    token = csrf(client, f"{FEATURE}/4")
    page = client.post(f"{FEATURE}/4/label?sort=frequency",
                       data={"label": "unsure", "note": "my typed note", "version": 0, "csrf_token": token})
    assert page.status_code == 409
    assert "changed by alice to reward-related (version 1) since you loaded the page" in page.text
    assert "my typed note</textarea>" in page.text  # the user's note survives the refusal
    assert 'name="version" value="1"' in page.text  # submitting again overwrites, knowingly
    assert n_events(migrated) == before
    assert labels.current(migrated, "synthetic", 3, 4) | {"updated_at": None} == {
        "run_id": "synthetic", "layer": 3, "feature": 4, "label": "reward", "note": "first", "author": "alice",
        "updated_at": None, "version": 1, **MADE_ON_THIS_RUN}


def test_html_form_saves_and_returns_to_the_same_view(client):
    token = csrf(client, f"{FEATURE}/6")
    r = client.post(f"{FEATURE}/6/label?sort=frequency&sign=pos",
                    data={"label": "unsure", "note": "maybe", "version": 0, "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"{FEATURE}/6?sort=frequency&sign=pos#label"
    html = client.get(r.headers["location"]).text
    assert 'id="current-label">unsure<' in html and 'name="version" value="1"' in html
    assert re.search(r'<li data-version="1">.*no label → <b>unsure</b>', html, re.S)


@pytest.mark.parametrize("method, path, body, status", [
    ("put", api(5), {"label": "maybe", "note": "", "version": 0}, 422),
    ("put", api(5), {"label": "reward", "note": "x" * 2001, "version": 0}, 422),
    ("put", api(5), {"label": "reward", "note": "", "version": -1}, 422),
    ("put", api(N_FEATURES), {"label": "reward", "note": "", "version": 0}, 404),
    ("put", api(5, layer=4), {"label": "reward", "note": "", "version": 0}, 404),
    ("put", "/api/runs/nope/layers/3/features/5/label", {"label": "reward", "note": "", "version": 0}, 404),
    ("get", api(N_FEATURES), None, 404),
    ("get", "/api/runs/nope/labels.csv", None, 404),
])
def test_bad_edits_are_refused(client, migrated, method, path, body, status):
    r = client.request(method, path, json=body)
    assert r.status_code == status and r.json()["detail"]
    assert n_events(migrated) == 0


def test_forms_need_the_csrf_token(client, migrated):
    csrf(client, f"{FEATURE}/5")  # the session has a token; the forged post does not know it
    form = client.post(f"{FEATURE}/5/label", data={"label": "reward", "note": "", "version": 0})
    assert form.status_code == 403 and "CSRF" in form.text
    wrong = client.post(f"{FEATURE}/5/label", data={"label": "reward", "version": 0, "csrf_token": "guess"})
    assert wrong.status_code == 403
    # a body a cross-site form could send (text/plain) is not JSON: it needs the token too
    plain = client.put(api(5), content='{"label": "reward", "note": "", "version": 0}',
                       headers={"content-type": "text/plain"})
    assert plain.status_code == 403
    assert n_events(migrated) == 0


def test_label_filter_keeps_exactly_the_labelled_features(client, migrated):
    chosen = {"reward": [3, 17, 40], "not_reward": [8], "unsure": [18, 63]}
    for label, ids in chosen.items():
        for f in ids:
            labels.set_label(migrated, "synthetic", 3, f, label, "", "alice", 0)
    labels.set_label(migrated, "synthetic", 5, 3, "unsure", "", "alice", 0)  # another layer: not in layer 3's view
    labelled = {f for ids in chosen.values() for f in ids}
    for label, ids in [*chosen.items(), ("unlabelled", sorted(set(range(N_FEATURES)) - labelled))]:
        shown = []
        for page in (1, 2):  # "unlabelled" takes two pages of 50
            query = {"label": label, "sort": "frequency", "page": page}
            data = client.get(f"/api{RUN}/layers/3", params=query).json()
            assert all(f["label"] == (None if label == "unlabelled" else label) for f in data["features"])
            html = client.get(f"{RUN}/layers/3", params=query).text
            assert [int(x) for x in re.findall(r'<tr data-feature="(\d+)"', html)] == [f["feature"] for f in data["features"]]
            shown += [f["feature"] for f in data["features"]]
            if data["n_pages"] == 1:
                break
        assert data["total"] == len(ids) and sorted(shown) == sorted(ids)
    html = client.get(f"{RUN}/layers/3", params={"label": "reward"}).text
    assert 'option value="reward" selected' in html and html.count('class="badge label-reward"') == 3
    # j/k on the feature page walk the same filtered list
    order = [f["feature"] for f in client.get(f"/api{RUN}/layers/3", params={"label": "reward"}).json()["features"]]
    in_view = client.get(f"/api{FEATURE}/{order[1]}", params={"label": "reward"}).json()["in_view"]
    assert in_view == {"index": 1, "total": 3, "previous": order[0], "next": order[2], "table_page": 1}
    assert client.get(f"/api{RUN}/layers/3", params={"label": "bogus"}).status_code == 422


def test_exports_hold_the_same_rows(client, migrated):
    labels.set_label(migrated, "synthetic", 5, 2, "not_reward", 'says "meh",\nthen stops', "bob", 0)
    labels.set_label(migrated, "synthetic", 3, 7, "reward", "amazing", "alice", 0)
    labels.set_label(migrated, "synthetic", 3, 1, "unsure", "", "alice", 0)
    r = client.get(f"/api{RUN}/labels.csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="labels-synthetic.csv"'
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == list(labels.EXPORT_COLUMNS)
    as_json = client.get(f"/api{RUN}/labels.json").json()
    assert [{k: "" if v is None else str(v) for k, v in row.items()} for row in as_json] == rows
    assert [(row["layer"], row["feature"], row["label"], row["author"]) for row in as_json] == [
        (3, 1, "unsure", "alice"), (3, 7, "reward", "alice"), (5, 2, "not_reward", "bob")]
    assert as_json[2]["note"] == 'says "meh",\nthen stops' and as_json[0]["version"] == 1
    assert 'href="/api/runs/synthetic/labels.csv"' in client.get(f"{RUN}/layers/3").text


def test_concurrent_writers_lose_no_update(live_server, migrated):  # noqa: F811
    """8 clients x 100 accepted writes on 4 shared features; a refused (409) write is retried
    from the version the refusal names."""
    threads_n, writes, features = 8, 100, (10, 11, 12, 13)
    errors: list[str] = []
    refused = [0] * threads_n

    def writer(t: int) -> None:
        known = dict.fromkeys(features, 0)  # the version this client last saw, as a page would
        try:
            with httpx.Client(base_url=live_server, timeout=30) as http:
                for i in range(writes):
                    feature = features[(t + i) % len(features)]
                    # a unique note: every write changes the label, so each one must leave an event
                    edit = {"label": LABELS[(t + i) % len(LABELS)], "note": f"t{t} #{i}"}
                    while True:
                        r = http.put(api(feature), json={**edit, "version": known[feature]})
                        if r.status_code == 200:
                            known[feature] = r.json()["version"]
                            break
                        assert r.status_code == 409, r.text
                        known[feature] = r.json()["current"]["version"]
                        refused[t] += 1
        except Exception as exc:  # noqa: BLE001  (reported by the main thread)
            errors.append(f"thread {t}: {exc!r}")

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sum(refused) > 0  # the writers did collide

    with db.session(migrated) as s:
        events = s.scalars(sa.select(LabelEvent).order_by(LabelEvent.feature, LabelEvent.version)).all()
    assert len(events) == threads_n * writes
    for feature in features:
        mine = [e for e in events if e.feature == feature]
        assert [e.version for e in mine] == list(range(1, len(mine) + 1))  # no gaps, no duplicates
        for before, after in zip([None, *mine], mine):
            assert (after.old_label, after.old_note) == ((before.new_label, before.new_note) if before else (None, None))
        now = labels.current(migrated, "synthetic", 3, feature)
        assert (now["label"], now["note"], now["version"]) == (mine[-1].new_label, mine[-1].new_note, len(mine))


def test_a_locked_database_is_retried_not_reported(client, migrated, monkeypatch):
    real_write, calls = labels._write, []

    def busy_twice(*args):
        calls.append(1)
        if len(calls) <= 2:
            raise sa.exc.OperationalError("UPDATE labels ...", {}, Exception("database is locked"))
        return real_write(*args)

    monkeypatch.setattr(labels, "_write", busy_twice)
    assert labels.set_label(migrated, "synthetic", 3, 5, "reward", "", "alice", 0)["version"] == 1
    assert len(calls) == 3 and n_events(migrated) == 1


def test_an_insert_racing_a_set_and_clear_is_refused(client, migrated, monkeypatch):
    """Between our read (no label, version 0) and our insert, someone set and cleared the label:
    the insert succeeds, but the history already has version 2, so it must not add a second 1."""
    labels.set_label(migrated, "synthetic", 3, 5, "reward", "", "alice", 0)
    labels.set_label(migrated, "synthetic", 3, 5, "", "", "bob", 1)
    real_state = labels._state
    monkeypatch.setattr(labels, "_state", lambda s, *key, lock=False: (
        {**real_state(s, *key), "version": 0, "author": None} if lock else real_state(s, *key)))
    with pytest.raises(labels.StaleLabel, match="changed by bob to no label \\(version 2\\)"):
        labels.set_label(migrated, "synthetic", 3, 5, "unsure", "", "carol", 0)
    assert [e["version"] for e in labels.history(migrated, "synthetic", 3, 5)] == [1, 2]
    assert labels.current(migrated, "synthetic", 3, 5)["label"] is None
