"""Nothing a user made is lost: labels and their history outlive a replaced run (each saying
whether it was made on the layer's current SAE), and deleting a run writes an export first."""
from __future__ import annotations

import hashlib
import html
import json
import re

import pytest
import sqlalchemy as sa

from backend import cli

from backend.core import db, labels
from backend.core.models import Label, LabelEvent, Run, Sae
from backend.core.settings import get_settings
from tests.helpers import make_client, publish_synthetic_run, synthetic_tables
from workers.publish import registry_rows

pytestmark = pytest.mark.sql_databases  # each test on SQLite and PostgreSQL (tests/conftest.py)

RUN = "synthetic"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def label_history(settings, layer: int, feature: int) -> list[tuple]:
    return [(e["version"], e["author"], e["old_label"], e["new_label"], e["new_note"], e["run_version"])
            for e in labels.history(settings, RUN, layer, feature)]


def counts(settings) -> dict[str, int]:
    with db.session(settings) as s:
        return {model.__tablename__: s.scalar(sa.select(sa.func.count()).select_from(model))
                for model in (Run, Sae, Label, LabelEvent)}


def run_version(settings) -> int:
    with db.session(settings) as s:
        return s.get(Run, RUN).version


def csrf(client, path: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text).group(1)


def test_labels_and_history_survive_a_replaced_run(migrated, synthetic_run):
    labels.set_label(migrated, RUN, 3, 5, "reward", "praise", "alice", 0)
    labels.set_label(migrated, RUN, 3, 5, "unsure", "praise?", "bob", 1)
    labels.set_label(migrated, RUN, 5, 2, "not_reward", "", "alice", 0)
    labels.set_label(migrated, RUN, 5, 2, "", "", "bob", 1)  # cleared: only its history remains
    before = (label_history(migrated, 3, 5), label_history(migrated, 5, 2))
    assert run_version(migrated) == 1

    publish_synthetic_run(migrated, replace=True)

    assert run_version(migrated) == 2
    assert (label_history(migrated, 3, 5), label_history(migrated, 5, 2)) == before
    now = labels.current(migrated, RUN, 3, 5)
    assert (now["label"], now["note"], now["author"], now["version"], now["run_version"]) == (
        "unsure", "praise?", "bob", 2, 1)
    # neither SAE has a weights file: nothing tells whether the layer's SAE changed
    assert now["made_on_current_sae"] is None
    assert labels.current(migrated, RUN, 5, 2)["version"] == 2  # the next edit follows the kept history
    assert counts(migrated) == {"runs": 1, "saes": 2, "labels": 1, "label_events": 4}

    publish_synthetic_run(migrated, replace=True)
    assert run_version(migrated) == 3 and len(label_history(migrated, 3, 5)) == 2


def test_a_label_made_on_another_sae_is_marked_and_one_on_the_same_sae_is_not(migrated):
    publish_synthetic_run(migrated, sae_weights={3: b"layer 3, first SAE", 5: b"layer 5, the same SAE"})
    with db.session(migrated) as s:
        assert dict(s.execute(sa.select(Sae.layer, Sae.fingerprint).where(Sae.run_id == RUN)).all()) == {
            3: sha256(b"layer 3, first SAE"), 5: sha256(b"layer 5, the same SAE")}
    made = labels.set_label(migrated, RUN, 3, 4, "reward", "fires on praise", "alice", 0)
    assert (made["run_version"], made["sae_fingerprint"], made["made_on_current_sae"]) == (
        1, sha256(b"layer 3, first SAE"), True)
    labels.set_label(migrated, RUN, 5, 4, "not_reward", "", "alice", 0)
    with db.session(migrated) as s:  # the event records what the label was made on, as the row does
        event = s.scalars(sa.select(LabelEvent).filter_by(run_id=RUN, layer=3, feature=4)).one()
        assert (event.sae_fingerprint, event.run_version) == (sha256(b"layer 3, first SAE"), 1)

    publish_synthetic_run(migrated, replace=True, sae_weights={3: b"layer 3, retrained", 5: b"layer 5, the same SAE"})

    changed, same = labels.current(migrated, RUN, 3, 4), labels.current(migrated, RUN, 5, 4)
    assert (changed["label"], changed["run_version"], changed["made_on_current_sae"]) == ("reward", 1, False)
    assert (same["label"], same["run_version"], same["made_on_current_sae"]) == ("not_reward", 1, True)
    # every read says the same: the feature page's, the layer table's and the export's
    assert labels.current_and_history(migrated, RUN, 3, 4)[0] == changed
    assert labels.labels_for_layer(migrated, RUN, 3)[4]["made_on_current_sae"] is False
    assert [(r["layer"], r["run_version"], r["made_on_current_sae"]) for r in labels.export_rows(migrated, RUN)] == [
        (3, 1, False), (5, 1, True)]

    # saving it again, unchanged, is the review: a new version, made on this run version's SAE
    reviewed = labels.set_label(migrated, RUN, 3, 4, "reward", "fires on praise", "bob", 1)
    assert (reviewed["version"], reviewed["run_version"], reviewed["made_on_current_sae"]) == (2, 2, True)
    assert labels.current(migrated, RUN, 3, 4)["made_on_current_sae"] is True
    assert [e[-1] for e in label_history(migrated, 3, 4)] == [1, 2]
    # ... while saving a label made on this version unchanged still writes nothing
    assert labels.set_label(migrated, RUN, 3, 4, "reward", "fires on praise", "carol", 2)["version"] == 2


def test_the_feature_page_and_the_layer_table_mark_a_label_made_on_an_earlier_sae(migrated):
    publish_synthetic_run(migrated, sae_weights={3: b"first", 5: b"unchanged"})
    labels.set_label(migrated, RUN, 3, 9, "reward", "praise words", "alice", 0)
    labels.set_label(migrated, RUN, 5, 9, "unsure", "", "alice", 0)
    publish_synthetic_run(migrated, replace=True, sae_weights={3: b"second", 5: b"unchanged"})
    mark = "Made on run version 1, whose SAE for this layer differed: review it."
    with make_client(migrated) as client:
        page = client.get(f"/runs/{RUN}/layers/3/features/9").text
        assert 'id="current-label">reward-related<' in page and "praise words" in page  # shown, not hidden
        assert mark in re.sub(r"\s+", " ", page) and "This is run version 2" in page
        assert "· on run version 1:" in page  # the history says which version each change was made on
        api = client.get(f"/api/runs/{RUN}/layers/3/features/9").json()
        assert (api["label"]["made_on_current_sae"], api["label"]["run_version"], api["run_version"]) == (False, 1, 2)
        table = client.get(f"/runs/{RUN}/layers/3", params={"label": "reward"}).text
        row = re.search(r'<tr data-feature="9">.*?</tr>', table).group(0)
        assert 'class="badge label-reward"' in row and "label-stale" in row
        assert "made on run version 1, whose SAE for this layer differed: review it" in row
        # the same SAE: no mark on either page
        assert 'id="label-stale"' not in client.get(f"/runs/{RUN}/layers/5/features/9").text
        other = client.get(f"/runs/{RUN}/layers/5", params={"label": "unsure"}).text
        assert "label-stale" not in re.search(r'<tr data-feature="9">.*?</tr>', other).group(0)

        # the page's own form, saved unchanged, clears the mark
        token = csrf(client, f"/runs/{RUN}/layers/3/features/9")
        saved = client.post(f"/runs/{RUN}/layers/3/features/9/label",
                            data={"label": "reward", "note": "praise words", "version": 1, "csrf_token": token})
        assert saved.status_code == 200 and 'id="label-stale"' not in saved.text  # followed the redirect
        assert 'id="current-label">reward-related<' in saved.text and 'name="version" value="2"' in saved.text


def test_a_label_on_a_layer_the_new_run_lacks_stays_in_sql_and_the_export(migrated, synthetic_run):
    labels.set_label(migrated, RUN, 5, 60, "reward", "kept", "alice", 0)
    tables = synthetic_tables()
    info = {"run_id": RUN, "name": "Synthetic, layer 3 only", "model": "tiny-random-rm", "adapter": "seq-cls",
            "dataset": "synthetic", "config_yaml": "layers: [3]\n", "n_texts": 20, "n_tokens": 160, "best_layer": 3}
    run_row, sae_rows = registry_rows(info, tables["layers"], db_run_dir(migrated))
    db.register_run(migrated, run_row, [row for row in sae_rows if row["layer"] == 3], replace=True)
    kept = labels.export_rows(migrated, RUN)
    assert [(r["layer"], r["feature"], r["label"], r["note"], r["made_on_current_sae"]) for r in kept] == [
        (5, 60, "reward", "kept", False)]
    with make_client(migrated) as client:
        assert [r["feature"] for r in client.get(f"/api/runs/{RUN}/labels.json").json()] == [60]
        assert f"{RUN},5,60,reward,kept,alice," in client.get(f"/api/runs/{RUN}/labels.csv").text


def db_run_dir(settings):
    return settings.run_dir(RUN).relative_to(settings.data_dir)


@pytest.mark.sql_databases("sqlite")  # the pipeline's part; replacing on each database is tested above
def test_a_replaced_pipeline_run_keeps_its_labels(settings, tmp_path):
    """The real pipeline on a tiny random BERT, run and then replaced with another seed (other SAE
    weights): the label stays, marked as made on the first SAE."""
    from tests.test_pipeline import tiny_config
    from tests.tiny_models import save_tiny_bert
    from workers.demo_corpus import generate_corpus, vader_reward
    from workers.pipeline import run_pipeline

    dataset = tmp_path / "reviews.jsonl"
    dataset.write_text("".join(json.dumps({"text": t, "reward": vader_reward(t)}) + "\n"
                               for t in generate_corpus(120, seed=3)))
    model = save_tiny_bert(tmp_path / "tiny-bert", n_layers=2)
    small = {"layers": [1], "sae": {"width": 32, "k": 4, "training_tokens": 2048, "batch_size": 256,
                                    "buffer_tokens": 1024}, "run_id": RUN}
    run_dir = run_pipeline(tiny_config(model, dataset, **small), settings)

    def fingerprint() -> str:
        with db.session(settings) as s:
            return s.scalars(sa.select(Sae.fingerprint).filter_by(run_id=RUN, layer=1)).one()

    first = fingerprint()
    assert first == sha256((run_dir / "saes" / "layer_1" / "sae_weights.safetensors").read_bytes())
    labels.set_label(settings, RUN, 1, 3, "reward", "from the first run", "alice", 0)

    run_pipeline(tiny_config(model, dataset, **small, seed=1), settings, replace=True)

    assert fingerprint() != first and run_version(settings) == 2
    now = labels.current(settings, RUN, 1, 3)
    assert (now["label"], now["note"], now["sae_fingerprint"], now["made_on_current_sae"]) == (
        "reward", "from the first run", first, False)


def test_deleting_a_run_writes_the_export_then_removes_it(client, migrated):
    labels.set_label(migrated, RUN, 3, 7, "reward", "amazing", "alice", 0)
    labels.set_label(migrated, RUN, 3, 7, "unsure", "amazing?", "bob", 1)
    labels.set_label(migrated, RUN, 5, 1, "not_reward", "", "alice", 0)
    # a body a cross-site form could send is refused, and deletes nothing
    assert client.delete(f"/api/runs/{RUN}").status_code == 403
    assert counts(migrated)["runs"] == 1

    r = client.delete(f"/api/runs/{RUN}", headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run_id"] == RUN and body["deleted"] is True
    assert re.fullmatch(rf"exports/{RUN}-\d{{8}}T\d{{6}}\.\d{{6}}Z\.json", body["export"])
    export = json.loads((migrated.data_dir / body["export"]).read_text())
    assert export["run"]["id"] == RUN and export["run"]["version"] == 1
    assert export["config_yaml"] == "model: tiny-random-rm\n"
    assert [s["layer"] for s in export["saes"]] == [3, 5]
    assert [(row["layer"], row["feature"], row["label"], row["note"], row["author"], row["version"])
            for row in export["labels"]] == [(3, 7, "unsure", "amazing?", "bob", 2), (5, 1, "not_reward", "", "alice", 1)]
    assert [(e["layer"], e["feature"], e["version"], e["old_label"], e["new_label"], e["author"])
            for e in export["label_events"]] == [
        (3, 7, 1, None, "reward", "alice"), (3, 7, 2, "reward", "unsure", "bob"), (5, 1, 1, None, "not_reward", "alice")]

    assert counts(migrated) == {"runs": 0, "saes": 0, "labels": 0, "label_events": 0}
    assert not migrated.run_dir(RUN).exists()
    assert client.get(f"/api/runs/{RUN}").status_code == 404
    assert client.delete(f"/api/runs/{RUN}", headers={"content-type": "application/json"}).status_code == 404


def test_deleting_an_unknown_run_is_a_404(client, migrated):
    r = client.delete("/api/runs/nope", headers={"content-type": "application/json"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert not (migrated.data_dir / "exports").exists()  # no export of nothing
    assert counts(migrated)["runs"] == 1


def test_a_failed_export_deletes_nothing(client, migrated):
    labels.set_label(migrated, RUN, 3, 7, "reward", "", "alice", 0)
    (migrated.data_dir / "exports").write_text("a file where the exports folder should be")
    r = client.delete(f"/api/runs/{RUN}", headers={"content-type": "application/json"})
    assert r.status_code == 507 and "nothing was deleted" in r.json()["detail"]
    assert counts(migrated) == {"runs": 1, "saes": 2, "labels": 1, "label_events": 1}
    assert migrated.run_dir(RUN).is_dir() and client.get(f"/api/runs/{RUN}").status_code == 200


def test_the_run_page_deletes_only_when_the_run_id_is_typed(client, migrated):
    labels.set_label(migrated, RUN, 3, 7, "reward", "", "alice", 0)
    page = client.get(f"/runs/{RUN}").text
    assert f'action="/runs/{RUN}/delete"' in page and 'name="confirm"' in page
    token = csrf(client, f"/runs/{RUN}")
    for typed, why in (("", "type the run id to confirm"), ("synthetc", "'synthetc' is not this run's id")):
        r = client.post(f"/runs/{RUN}/delete", data={"confirm": typed, "csrf_token": token})
        assert r.status_code == 422 and f"Nothing was deleted: {why} ({RUN})." in html.unescape(r.text)
    assert client.post(f"/runs/{RUN}/delete", data={"confirm": RUN}).status_code == 403  # no CSRF token
    assert counts(migrated)["labels"] == 1 and not (migrated.data_dir / "exports").exists()

    done = client.post(f"/runs/{RUN}/delete", data={"confirm": RUN, "csrf_token": token})
    assert done.status_code == 200
    (export,) = (migrated.data_dir / "exports").glob("*.json")
    assert f"exports/{export.name}" in done.text
    assert [row["feature"] for row in json.loads(export.read_text())["labels"]] == [7]
    assert counts(migrated)["runs"] == 0 and client.get(f"/runs/{RUN}").status_code == 404


def test_cli_delete_run_prints_where_the_export_is(migrated, synthetic_run, monkeypatch, capsys):
    labels.set_label(migrated, RUN, 3, 2, "unsure", "check", "alice", 0)
    monkeypatch.setenv("RA_DATA_DIR", str(migrated.data_dir))
    monkeypatch.setenv("RA_DATABASE_URL", migrated.database_url)
    get_settings.cache_clear()
    try:
        assert cli.main(["delete-run", "nope"]) == 2
        assert "no run 'nope' is registered: nothing was deleted" in capsys.readouterr().err
        assert cli.main(["delete-run", RUN]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    path = re.search(r"are in (\S+\.json)$", out.strip()).group(1)
    export = json.loads(open(path).read())
    assert export["run"]["id"] == RUN and [e["new_note"] for e in export["label_events"]] == ["check"]
    assert counts(migrated) == {"runs": 0, "saes": 0, "labels": 0, "label_events": 0}
