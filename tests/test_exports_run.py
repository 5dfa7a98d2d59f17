"""Exports of a real (tiny, random) run: a whole layer in Neuronpedia's layout, checked against the
schema written from Neuronpedia's models and against the store; SAEDashboard's page of a feature,
rendered by the sae-dashboard package from the run's TopK SAE (trained without decoder-norm
rescaling, which SAEDashboard's runner cannot fold) through the job the feature page queues, and
from the CLI; and a layer whose SAE is gone from disk refused by both."""
from __future__ import annotations

import gzip
import json
import re
import shutil

import pytest

from backend.core import db, labels, store
from backend.cli import main
from backend.core.exports import neuronpedia
from backend.core.exports.source import open_layer
from backend.core.settings import Settings, get_settings
from tests.helpers import make_client
from tests.tiny_models import save_tiny_bert
from backend.core.run_config import parse_config
from workers.pipeline import run_pipeline

RUN, LAYER, WIDTH = "tiny-export", 1, 64


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from workers.demo_corpus import generate_corpus, vader_reward

    root = tmp_path_factory.mktemp("export-run")
    model = save_tiny_bert(root / "tiny-bert")
    dataset = root / "reviews.jsonl"
    dataset.write_text("".join(json.dumps({"text": t, "reward": vader_reward(t)}) + "\n"
                               for t in generate_corpus(120, seed=7)))
    settings = Settings(data_dir=root / "data", database_url="")
    config = parse_config({
        "name": "Tiny export run", "run_id": RUN, "model": {"path": str(model), "max_length": 32},
        "dataset": {"source": str(dataset), "batch_size": 32}, "layers": [LAYER],
        "sae": {"width": WIDTH, "k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 1024},
        "analysis": {"n_contexts": 5, "ranked_texts": 20}, "regression": {"pooling": "mean"}})
    run_pipeline(config, settings)
    yield settings
    db.dispose_engines()


@pytest.fixture
def cli(tiny_run, monkeypatch):
    monkeypatch.setenv("RA_DATA_DIR", str(tiny_run.data_dir))
    get_settings.cache_clear()
    yield main
    get_settings.cache_clear()


def strongest_feature(settings) -> int:
    source = open_layer(settings, RUN, LAYER)
    return store.features(source.store_path, LAYER, "max_activation", limit=1).rows[0]["feature"]


def test_whole_layer_in_neuronpedias_layout_follows_its_schema_and_carries_the_reward(cli, tiny_run, tmp_path, capsys):
    import jsonschema

    feature = strongest_feature(tiny_run)
    labels.set_label(tiny_run, RUN, LAYER, feature, "reward", "fires on the review's verdict", "ann", 0)
    assert cli(["export", "neuronpedia", RUN, "--layer", str(LAYER), "--batch-features", "32",
                "--out", str(tmp_path / "np")]) == 0
    captured = capsys.readouterr()
    assert f"{WIDTH} features" in captured.out and "100%" in captured.err  # the layer's progress
    (base,) = (tmp_path / "np").glob("*/*")
    schema = neuronpedia.load_schema()

    def rows(folder):
        return [json.loads(line) for path in sorted((base / folder).glob("batch-*.jsonl.gz"))
                for line in gzip.decompress(path.read_bytes()).splitlines()]

    neurons, activations, explanations = rows("features"), rows("activations"), rows("explanations")
    for kind, found in (("Neuron", neurons), ("Activation", activations), ("Explanation", explanations)):
        for row in found:
            jsonschema.validate(row, {**schema, "$ref": f"#/$defs/{kind}"})
    for name, kind in (("release.jsonl", "SourceRelease"), ("model.jsonl", "Model"), ("sourceset.jsonl", "SourceSet"),
                       ("source.jsonl", "Source")):
        jsonschema.validate(json.loads((base / name).read_text()), {**schema, "$ref": f"#/$defs/{kind}"})
    assert sorted(int(n["index"]) for n in neurons) == list(range(WIDTH))
    assert json.loads((base / "model.jsonl").read_text())["layers"] == 3  # the tiny BERT's blocks
    assert json.loads((base / "source.jsonl").read_text())["saelensConfig"]["d_sae"] == WIDTH

    source = open_layer(tiny_run, RUN, LAYER)
    card = store.feature(source.store_path, LAYER, feature)
    mine = next(n for n in neurons if n["index"] == str(feature))
    assert mine["maxActApprox"] == pytest.approx(card["max_activation"])
    assert mine["frac_nonzero"] == pytest.approx(card["frequency"])
    reward = mine["reward"]
    assert reward["weight"] == pytest.approx(card["weight"]) and reward["attribution"] == pytest.approx(card["attribution"])
    assert (reward["measured_delta"], reward["measured_delta_low"], reward["measured_delta_high"]) == pytest.approx(
        (card["measured_delta"], card["measured_delta_low"], card["measured_delta_high"]), nan_ok=True)
    assert reward["label"] == "reward" and reward["default_ranking"] == source.info["default_ranking"]
    top = card["contexts"][0]
    shown = [a for a in activations if a["index"] == str(feature) and a["reward"]["kind"] == "top"]
    assert shown[0]["maxValue"] == pytest.approx(top["activation"], rel=1e-5)
    assert shown[0]["dataIndex"] == str(top["text_id"]) and len(shown) == len(card["contexts"])
    assert explanations[0]["description"] == "fires on the review's verdict"
    words = "".join(shown[0]["tokens"]).split()  # MiniLM's WordPiece spelled as the text reads
    assert words == "".join(neuronpedia.surface_tokens(top["tokens"], "wordpiece")).split() and len(words) > 1
    manifest = json.loads((base / "rewardatlas.json").read_text())
    assert manifest["whole_layer"] and manifest["rows"]["features"] == WIDTH


def dashboard_sequences(page: str, feature: int) -> list[list[dict]]:
    """The top-activations examples of SAEDashboard's page: each a list of {tok, featAct, isBold}."""
    data = page[page.index("function defineData()"):]
    data = json.loads(data[data.index("return ") + 7:data.index(";\n")])
    groups = data["DASHBOARD_DATA"][str(feature)]["tokenData"]
    (top,) = [g for g in groups.values() if g["title"].startswith("TOP ACTIVATIONS")]
    return top["data"]


def shows_top_contexts(page: str, settings, feature: int) -> None:
    """The page's top examples are the feature's top contexts on its page: same peaks, same words."""
    source = open_layer(settings, RUN, LAYER)
    card = store.feature(source.store_path, LAYER, feature)
    sequences = dashboard_sequences(page, feature)
    peaks = sorted((max((t.get("featAct") or 0) for t in seq) for seq in sequences), reverse=True)
    for context, peak in zip(card["contexts"][:3], peaks):
        assert peak == pytest.approx(context["activation"], abs=2e-3)
    best = card["contexts"][0]
    shown = best["tokens"][1:best["position"] - best["window_start"] + 1]  # after [CLS], up to the peak
    words = "".join(neuronpedia.surface_tokens(shown, "wordpiece")).split()
    texts = ["".join(t["tok"] for t in seq).split() for seq in sequences]
    assert any(" ".join(words) in " ".join(text) for text in texts), (words, texts[:3])


def test_saedashboard_page_from_the_feature_pages_job(tiny_run):
    from workers.worker import Worker

    feature = strongest_feature(tiny_run)
    assert json.loads((open_layer(tiny_run, RUN, LAYER).sae_dir / "cfg.json").read_text())[
        "rescale_acts_by_decoder_norm"] is False  # the runner's fold would refuse this SAE
    with make_client(tiny_run) as client:
        page = client.get(f"/runs/{RUN}/layers/{LAYER}/features/{feature}").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        queued = client.post(f"/runs/{RUN}/layers/{LAYER}/features/{feature}/saedashboard",
                             data={"csrf_token": token}, follow_redirects=False)
        assert queued.status_code == 303
        job_id = int(queued.headers["location"].rsplit("/", 1)[1])
        assert Worker(tiny_run).run_one()
        job = client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "done", job["error"]
        assert job["result"]["n_texts"] == 120 and job["result"]["url"].endswith("/saedashboard.html")
        assert 'id="dashboard-link"' in client.get(f"/jobs/{job_id}").text
        served = client.get(job["result"]["url"])
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/html")
        assert "sandbox allow-scripts" in served.headers["content-security-policy"]
        assert 'id="saedashboard-open"' in client.get(f"/runs/{RUN}/layers/{LAYER}/features/{feature}").text
    page = served.text
    assert "<script src=" not in page  # d3 and plotly inlined: the page opens offline
    assert f"<b>feature</b> {feature}" in page and "regression weight" in page
    shows_top_contexts(page, tiny_run, feature)


def test_saedashboard_from_the_cli_and_a_layer_without_its_sae(cli, tiny_run, tmp_path, capsys):
    feature = strongest_feature(tiny_run)
    out = tmp_path / "dash.html"
    assert cli(["export", "saedashboard", RUN, "--layer", str(LAYER), "--feature", str(feature), "--texts", "60",
                "--out", str(out)]) == 0
    assert "60 texts" in capsys.readouterr().out
    assert dashboard_sequences(out.read_text(), feature)
    assert cli(["export", "saedashboard", RUN, "--layer", str(LAYER), "--feature", str(WIDTH)]) == 2
    assert f"no feature {WIDTH}" in capsys.readouterr().err

    sae_dir = open_layer(tiny_run, RUN, LAYER).sae_dir
    moved = sae_dir.with_name("elsewhere")
    shutil.move(sae_dir, moved)
    try:
        gone = tmp_path / "gone.html"
        assert cli(["export", "saedashboard", RUN, "--layer", str(LAYER), "--feature", "0", "--out", str(gone)]) == 2
        assert "no SAE on disk" in capsys.readouterr().err and not gone.exists()
        assert cli(["export", "neuronpedia", RUN, "--layer", str(LAYER), "--out", str(tmp_path / "np")]) == 2
        assert "no SAE on disk" in capsys.readouterr().err and not (tmp_path / "np").exists()
        with make_client(tiny_run) as client:
            refused = client.post(f"/api/runs/{RUN}/layers/{LAYER}/features/0/saedashboards", json={})
            assert refused.status_code == 409 and "no SAE on disk" in refused.json()["detail"]
    finally:
        shutil.move(moved, sae_dir)
