"""Exports on the synthetic run (no model): the layer table as CSV and Parquet, labels with their
features' statistics and history, Neuronpedia's layout over the web, the buttons on their pages,
the CLI's errors and its all-or-nothing writes."""
from __future__ import annotations

import csv
import gzip
import io
import json
import zipfile

import pyarrow.parquet as pq
import pytest

from backend.core import labels
from backend.cli import main
from backend.core.exports import neuronpedia
from backend.core.settings import get_settings
from tests.helpers import CONTEXT_FEATURE, DEAD_FEATURE, N_FEATURES

RUN = "synthetic"
LAYER = 3


def all_ids(client, query: str) -> list[int]:
    """The features the layer page lists for `query`, every page of it, in its order."""
    ids, page = [], 1
    while True:
        body = client.get(f"/api/runs/{RUN}/layers/{LAYER}?{query}&page={page}").json()
        ids += [row["feature"] for row in body["features"]]
        if page >= body["n_pages"]:
            return ids
        page += 1


def write_sae_config(settings, layer: int = LAYER) -> None:
    """The synthetic run's SAE directory holds no SAE; exports that need one on disk find its config."""
    sae_dir = settings.run_dir(RUN) / f"saes/layer_{layer}"
    sae_dir.mkdir(parents=True, exist_ok=True)
    (sae_dir / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": N_FEATURES, "architecture": "topk"}))


# --- the layer table ----------------------------------------------------------------------------

def test_table_csv_lists_the_layer_pages_view_in_its_order_with_statistics_and_labels(client, migrated):
    labels.set_label(migrated, RUN, LAYER, CONTEXT_FEATURE, "reward", "=amazing", "ann", 0)
    response = client.get(f"/api/runs/{RUN}/layers/{LAYER}/features.csv?sign=pos&sort=-weight")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["feature"]) for r in rows] == all_ids(client, "sign=pos&sort=-weight")
    assert [int(r["view_rank"]) for r in rows] == list(range(1, len(rows) + 1))
    assert {"frequency", "weight", "attribution", "measured_delta", "measured_delta_low", "top_token",
            "default_rank", "label"} <= set(rows[0])
    mine = next(r for r in rows if int(r["feature"]) == CONTEXT_FEATURE)
    assert mine["label"] == "reward" and mine["label_note"] == "'=amazing"  # a formula stays text in a spreadsheet
    assert mine["default_ranking"] == "attribution"


def test_table_parquet_holds_the_same_rows_and_says_what_it_is(client):
    query = "min_freq=5&token=good"
    as_csv = list(csv.DictReader(io.StringIO(client.get(f"/api/runs/{RUN}/layers/{LAYER}/features.csv?{query}").text)))
    response = client.get(f"/api/runs/{RUN}/layers/{LAYER}/features.parquet?{query}")
    assert response.status_code == 200
    table = pq.read_table(io.BytesIO(response.content))
    assert table.column("feature").to_pylist() == [int(r["feature"]) for r in as_csv] == all_ids(client, query)
    assert table.column("weight").to_pylist() == pytest.approx([float(r["weight"]) for r in as_csv])
    meta = json.loads(table.schema.metadata[b"rewardatlas"])
    assert meta["run_id"] == RUN and meta["layer"] == LAYER and meta["view"]["token"] == "good"
    assert meta["layer_metrics"]["d_sae"] == N_FEATURES


def test_an_empty_view_is_a_header_and_bad_views_are_refused(client):
    empty = client.get(f"/api/runs/{RUN}/layers/{LAYER}/features.csv?min_freq=100")
    assert empty.status_code == 200 and empty.text.strip().splitlines()[0].startswith("layer,feature,")
    assert len(empty.text.strip().splitlines()) == 1
    assert client.get(f"/api/runs/{RUN}/layers/{LAYER}/features.csv?min_freq=50&max_freq=10").status_code == 422
    assert client.get(f"/api/runs/{RUN}/layers/4/features.parquet").status_code == 404
    missing = client.get("/api/runs/nope/layers/3/features.csv")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


# --- labels ------------------------------------------------------------------------------------

def test_labels_export_with_statistics_and_the_whole_history(client, migrated):
    labels.set_label(migrated, RUN, LAYER, CONTEXT_FEATURE, "reward", "fires on amazing", "ann", 0)
    labels.set_label(migrated, RUN, LAYER, CONTEXT_FEATURE, "unsure", "maybe", "bob", 1)
    labels.set_label(migrated, RUN, 5, 2, "not_reward", "", "ann", 0)
    labels.set_label(migrated, RUN, 5, 2, None, "", "ann", 1)  # cleared: no label now, its history stays
    body = client.get(f"/api/runs/{RUN}/labels-with-stats.json").json()
    records = {(r["layer"], r["feature"]): r for r in body["labels"]}
    assert set(records) == {(LAYER, CONTEXT_FEATURE), (5, 2)}
    mine = records[(LAYER, CONTEXT_FEATURE)]
    card = client.get(f"/api/runs/{RUN}/layers/{LAYER}/features/{CONTEXT_FEATURE}").json()["feature"]
    assert (mine["label"], mine["author"], mine["version"]) == ("unsure", "bob", 2)
    assert mine["weight"] == pytest.approx(card["weight"]) and mine["top_token"] == "amaz"
    assert [(h["old_label"], h["new_label"], h["author"]) for h in mine["history"]] == [
        (None, "reward", "ann"), ("reward", "unsure", "bob")]
    cleared = records[(5, 2)]
    assert cleared["label"] is None and len(cleared["history"]) == 2 and cleared["orphaned"] is False
    rows = list(csv.DictReader(io.StringIO(client.get(f"/api/runs/{RUN}/labels-with-stats.csv").text)))
    assert [(int(r["layer"]), int(r["feature"])) for r in rows] == list(records)
    assert json.loads(rows[0]["history"]) == mine["history"] and rows[0]["n_changes"] == "2"
    assert client.get("/api/runs/nope/labels-with-stats.json").status_code == 404
    assert client.get(f"/api/runs/{RUN}/labels-with-stats.xml").status_code == 422


# --- Neuronpedia over the web ------------------------------------------------------------------------

def test_neuronpedia_zip_of_chosen_features_carries_the_reward(client, migrated):
    write_sae_config(migrated)
    labels.set_label(migrated, RUN, LAYER, CONTEXT_FEATURE, "reward", "fires on amazing", "ann", 0)
    response = client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip?features={CONTEXT_FEATURE}&features=2"
                          "&model_id=tiny-rm&source_set=res-64")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    root = "tiny-rm/3-res-64/"
    assert {root + name for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl",
                                     "features/batch-0.jsonl.gz", "activations/batch-0.jsonl.gz",
                                     "explanations/batch-0.jsonl.gz", "rewardatlas.json")} == set(archive.namelist())
    neurons = [json.loads(line) for line in gzip.decompress(archive.read(root + "features/batch-0.jsonl.gz")).splitlines()]
    assert [n["index"] for n in neurons] == ["2", str(CONTEXT_FEATURE)]
    reward = neurons[1]["reward"]
    assert reward["label"] == "reward" and reward["default_ranking"] == "attribution" and reward["default_rank"] >= 1
    explanation = json.loads(gzip.decompress(archive.read(root + "explanations/batch-0.jsonl.gz")))
    assert explanation["description"] == "fires on amazing" and explanation["index"] == str(CONTEXT_FEATURE)


def test_neuronpedia_of_a_filtered_view_exports_the_features_it_lists(client, migrated):
    write_sae_config(migrated)
    response = client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip?sign=neg")
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    indices = [json.loads(line)["index"] for name in archive.namelist() if "/features/" in name
               for line in gzip.decompress(archive.read(name)).splitlines()]
    assert sorted(map(int, indices)) == sorted(all_ids(client, "sign=neg"))


def test_neuronpedia_refuses_missing_features_a_missing_sae_and_bad_names(client, migrated):
    no_sae = client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip")
    assert no_sae.status_code == 409 and "no SAE on disk" in no_sae.json()["detail"]
    write_sae_config(migrated)
    missing = client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip?features=7&features={N_FEATURES}")
    assert missing.status_code == 404 and f"no feature {N_FEATURES}" in missing.json()["detail"]
    assert client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip?model_id=Bad%20Name").status_code == 422
    assert client.get(f"/api/runs/{RUN}/layers/9/neuronpedia.zip").status_code == 404
    nothing = client.get(f"/api/runs/{RUN}/layers/{LAYER}/neuronpedia.zip?min_freq=100")
    assert nothing.status_code == 422 and "no features" in nothing.text


def test_neuronpedia_rows_follow_the_schema_and_each_file_keeps_one_set_of_keys(migrated, synthetic_run, tmp_path):
    import jsonschema

    write_sae_config(migrated)
    export = neuronpedia.prepare(migrated, RUN, LAYER, None, neuronpedia.Options(batch_features=16))
    done = neuronpedia.write_dir(export, tmp_path / "np")
    base = tmp_path / "np" / export.root
    assert done["features"] == N_FEATURES and len(list((base / "features").glob("batch-*.jsonl.gz"))) == 4
    schema = neuronpedia.load_schema()
    kinds = {"features": "Neuron", "activations": "Activation"}
    for folder, kind in kinds.items():
        for path in (base / folder).glob("*.jsonl.gz"):
            rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
            assert len({tuple(row) for row in rows}) == 1, path  # the importer takes a file's columns from its first line
            for row in rows:
                jsonschema.validate(row, {**schema, "$ref": f"#/$defs/{kind}"})
    dead = [json.loads(line) for line in gzip.decompress((base / "features/batch-3.jsonl.gz").read_bytes()).splitlines()
            if json.loads(line)["index"] == str(DEAD_FEATURE)]
    assert dead[0]["frac_nonzero"] == 0 and dead[0]["reward"]["default_rank"] is None


def test_neuronpedia_carries_written_explanations_with_their_scores(migrated, synthetic_run, tmp_path):
    import jsonschema

    from backend.core import explanations

    write_sae_config(migrated)
    written = explanations.write(migrated, RUN, LAYER, 7, "praise of the acting", explainer="offline", model="",
                                 prompt_version="v1", tokens=0, embedding=None, author="tester")
    explanations.set_scores(migrated, written["id"], {"detection": {"score": 0.75}, "causal": {"score": 0.5}}, "tester")
    export = neuronpedia.prepare(migrated, RUN, LAYER, [7, 8], neuronpedia.Options())
    neuronpedia.write_dir(export, tmp_path / "np")
    rows = [json.loads(line) for path in (tmp_path / "np" / export.root / "explanations").glob("*.jsonl.gz")
            for line in gzip.decompress(path.read_bytes()).splitlines()]
    mine = [r for r in rows if r["index"] == "7" and "explanation" in r["id"]]
    assert mine and mine[0]["description"] == "praise of the acting" and mine[0]["typeName"] == "rewardatlas-offline"
    assert "detection 0.75" in mine[0]["notes"] and "causal 0.5" in mine[0]["notes"]
    assert len({tuple(r) for r in rows}) == 1  # one set of keys per file, label rows included
    for row in rows:
        jsonschema.validate(row, {**neuronpedia.load_schema(), "$ref": "#/$defs/Explanation"})


# --- buttons --------------------------------------------------------------------------------------

def test_each_page_has_its_export_buttons(client, migrated):
    layer_page = client.get(f"/runs/{RUN}/layers/{LAYER}?sign=pos").text
    for href in ("features.csv?sign=pos", "features.parquet?sign=pos", "neuronpedia.zip?sign=pos"):
        assert f'href="/api/runs/{RUN}/layers/{LAYER}/{href}"' in layer_page
    assert "Export this view" in layer_page
    feature_page = client.get(f"/runs/{RUN}/layers/{LAYER}/features/{CONTEXT_FEATURE}").text
    assert f'action="/runs/{RUN}/layers/{LAYER}/features/{CONTEXT_FEATURE}/saedashboard"' in feature_page
    assert f"neuronpedia.zip?features={CONTEXT_FEATURE}" in feature_page and "saedashboard-open" not in feature_page
    labels_page = client.get(f"/runs/{RUN}/labels").text
    assert f'href="/api/runs/{RUN}/labels-with-stats.csv"' in labels_page


def test_saedashboard_jobs_are_refused_without_the_sae_or_the_feature(client, migrated):
    no_sae = client.post(f"/api/runs/{RUN}/layers/{LAYER}/features/7/saedashboards", json={})
    assert no_sae.status_code == 409 and "no SAE on disk" in no_sae.json()["detail"]
    write_sae_config(migrated)
    assert client.post(f"/api/runs/{RUN}/layers/{LAYER}/features/{N_FEATURES}/saedashboards", json={}).status_code == 404
    queued = client.post(f"/api/runs/{RUN}/layers/{LAYER}/features/7/saedashboards", json={"n_texts": 12})
    assert queued.status_code == 201 and queued.json()["kind"] == "saedashboard"
    assert queued.json()["params"]["n_texts"] == 12
    not_yet = client.get(f"/runs/{RUN}/layers/{LAYER}/features/7/saedashboard.html")
    assert not_yet.status_code == 404 and "render it" in not_yet.text


# --- the CLI -------------------------------------------------------------------------------------

@pytest.fixture
def cli(migrated, synthetic_run, monkeypatch):
    monkeypatch.setenv("RA_DATA_DIR", str(migrated.data_dir))
    get_settings.cache_clear()
    yield main
    get_settings.cache_clear()


def test_cli_errors_name_the_problem_and_write_nothing(cli, migrated, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "np"
    assert cli(["export", "neuronpedia", RUN, "--layer", "3", "--out", str(out)]) == 2
    assert "no SAE on disk" in capsys.readouterr().err and not out.exists()
    write_sae_config(migrated)
    assert cli(["export", "neuronpedia", RUN, "--layer", "3", "--features", "1,64", "--out", str(out)]) == 2
    assert "no feature 64" in capsys.readouterr().err and not out.exists()
    assert cli(["export", "table", "nope", "--layer", "3", "--out", str(folder / "t.csv")]) == 2
    assert "run 'nope' not found" in capsys.readouterr().err
    assert cli(["export", "table", RUN, "--layer", "3", "--min-freq", "90", "--max-freq", "10"]) == 2
    assert "min_freq" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_cli_writes_whole_or_not_at_all(cli, migrated, tmp_path, capsys, monkeypatch):
    write_sae_config(migrated)
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "np"
    assert cli(["export", "neuronpedia", RUN, "--layer", "3", "--batch-features", "16", "--out", str(out)]) == 0
    assert "64 features" in capsys.readouterr().out
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli(["export", "neuronpedia", RUN, "--layer", "3", "--out", str(out)]) == 2  # exists: no --replace
    assert "already exists" in capsys.readouterr().err

    def broken(con, export, ids, ranking, ranks):
        if ids[0] >= 32:
            raise OSError("disk full")
        return real(con, export, ids, ranking, ranks)

    real = neuronpedia._batch_rows
    monkeypatch.setattr(neuronpedia, "_batch_rows", broken)
    with pytest.raises(OSError):
        cli(["export", "neuronpedia", RUN, "--layer", "3", "--batch-features", "16", "--out", str(out), "--replace"])
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # the earlier export, untouched
    assert [p.name for p in folder.iterdir()] == ["np"]  # and no temporary folder left behind
    table = folder / "t.parquet"
    assert cli(["export", "table", RUN, "--layer", "3", "--format", "parquet", "--sign", "pos", "--out", str(table)]) == 0
    assert pq.read_table(table).num_rows == len(synthetic_run_pos(migrated))


def synthetic_run_pos(settings) -> list[int]:
    from backend.core import store
    from backend.core.exports.source import open_layer

    source = open_layer(settings, RUN, LAYER)
    return [r["feature"] for r in store.features(source.store_path, LAYER, "attribution",
                                                 store.FeatureFilter(sign="pos", sign_column="attribution"),
                                                 limit=1000).rows]
