"""run -> store -> SQL registry -> pages, on a tiny random BERT; plus failure atomicity."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest

from backend.core import db
from backend.core.layer_choice import best_layer
from backend.core.models import Run
from backend.core.rankings import RANKINGS
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from tests.tiny_models import save_tiny_bert
from workers import publish
from backend.core.run_config import parse_config
from workers.pipeline import run_pipeline

N_FEATURES = 64
RANKED_TEXTS = 50  # of the 240 texts: features firing on more keep only their strongest 50


def tiny_config(model_path, dataset_path, **overrides):
    data = {
        "name": "Tiny Run",
        "model": {"path": str(model_path), "max_length": 32},
        "dataset": {"source": str(dataset_path), "batch_size": 32},
        "layers": [0, 2],
        # SAELens's own zero start: these tiny random models' tests were written against it
        "sae": {"width": N_FEATURES, "k": 4, "training_tokens": 4096, "batch_size": 256, "buffer_tokens": 1024,
                "decoder_bias_init": "zero"},
        "analysis": {"n_contexts": 5, "ranked_texts": RANKED_TEXTS},
        "regression": {"pooling": "mean"},
        **overrides,
    }
    return parse_config(data)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_path = save_tiny_bert(root / "tiny-bert")
    from workers.demo_corpus import generate_corpus, vader_reward

    dataset = root / "reviews.jsonl"
    with dataset.open("w") as f:
        for text in generate_corpus(240, seed=7):
            f.write(json.dumps({"text": text, "reward": vader_reward(text)}) + "\n")
    return model_path, dataset


@pytest.fixture(scope="module")
def progress_log() -> list[tuple[str, float]]:
    """(the stage's message, the run's progress) for every progress report of finished_run."""
    return []


@pytest.fixture(scope="module")
def finished_run(tiny_world, tmp_path_factory, progress_log):
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    config = tiny_config(*tiny_world)
    stages = ["(before any stage)"]
    run_dir = run_pipeline(config, settings, on_stage=stages.append,
                           on_progress=lambda p: progress_log.append((stages[-1], p)))
    yield settings, run_dir
    db.dispose_engines()


def test_every_stage_reports_progress_per_batch_and_the_bar_only_moves_forward(finished_run, progress_log):
    """Each report is where a cancelled job stops: every stage must report at least per batch."""
    values = [p for _, p in progress_log]
    assert values == sorted(values) and 0 <= values[0] and values[-1] <= 1
    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    n_heldout = con.execute("select count(*) from texts where split = 'heldout'").fetchone()[0]
    con.close()

    def reports(stage: str) -> list[float]:
        return [p for message, p in progress_log if stage in message]

    # SAE training: one report per batch drawn, 20 for the norm estimate and one per step
    training = reports("training 2 SAEs")
    assert len(training) >= 20 + 4096 // 256 and training[-1] > training[0]
    assert len(set(training)) >= 4096 // 256  # the bar moves during training, step by step
    assert len(reports("analysing 240 texts")) >= 240 // 32  # one per batch of the analysis pass
    assert len(reports("reward recovered")) >= -(-n_heldout // 32)
    for layer in (0, 2):  # the causal stage: per chunk of measured effects, per deletion-curve point
        assert len(reports(f"layer {layer}: measuring")) >= 2
        assert len(reports(f"layer {layer}: deletion curves")) >= 5


def test_store_holds_every_feature_with_weight_and_contexts(finished_run):
    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    assert con.execute("select count(*) from texts").fetchone()[0] == 240
    per_layer = dict(con.execute("select layer, count(*) from features group by layer").fetchall())
    assert per_layer == {0: N_FEATURES, 2: N_FEATURES}
    assert con.execute("select count(*) from features where weight is null").fetchone()[0] == 0
    live = con.execute("select count(*) from features where frequency > 0").fetchone()[0]
    with_contexts = con.execute("select count(distinct (layer, feature)) from contexts").fetchone()[0]
    assert live == with_contexts > 0
    # a context's peak token carries the activation the context is ranked by
    tokens, acts, position, start, activation = con.execute(
        "select tokens, acts, position, window_start, activation from contexts order by activation desc limit 1"
    ).fetchone()
    assert acts[position - start] == pytest.approx(activation, rel=1e-5)
    assert max(acts) == pytest.approx(activation, rel=1e-5)
    layers = con.execute("select layer, r2_heldout, explained_variance, l0 from layers order by layer").fetchall()
    assert [row[0] for row in layers] == [0, 2]
    assert all(0 < row[3] <= 4 + 1e-6 for row in layers)  # TopK k=4


def test_saes_open_with_sae_lens(finished_run):
    from sae_lens import SAE

    settings, run_dir = finished_run
    for layer in (0, 2):
        sae = SAE.load_from_disk(run_dir / "saes" / f"layer_{layer}")
        assert sae.cfg.d_sae == N_FEATURES and sae.cfg.d_in == 32
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"


def test_store_keeps_decoder_neighbours_and_a_token_index(finished_run):
    from sae_lens import SAE

    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    w_dec = SAE.load_from_disk(run_dir / "saes" / "layer_2").W_dec.detach()
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    neighbours, cosines = con.execute(
        "select neighbours, neighbour_cosines from features where layer = 2 and feature = 5").fetchone()
    assert len(neighbours) == 10 and 5 not in neighbours
    assert cosines == sorted(cosines, reverse=True)
    assert cosines[0] == pytest.approx(float(unit[5] @ unit[neighbours[0]]), abs=1e-5)
    # every top context's peak token is searchable for its feature
    token, feature = con.execute("select tokens[position - window_start + 1], feature from contexts "
                                 "where layer = 2 and kind = 'top' order by activation desc limit 1").fetchone()
    plain = token.removeprefix("##").removeprefix("\u0120").lower()
    assert con.execute("select count(*) from feature_tokens where layer = 2 and token = ? and feature = ?",
                       [plain, feature]).fetchone()[0] == 1


def test_run_registered_in_sql(finished_run):
    settings, _ = finished_run
    with db.session(settings) as s:
        run = s.get(Run, "tiny-run")
        assert run is not None and run.n_texts == 240
        assert [sae.layer for sae in run.saes] == [0, 2]
        assert [sae.path for sae in run.saes] == ["runs/tiny-run/saes/layer_0", "runs/tiny-run/saes/layer_2"]
    # the best layer, chosen once: the runs row and the store's run_info have the same
    con = duckdb.connect(str(settings.run_dir("tiny-run") / STORE_FILENAME), read_only=True)
    stored = con.execute("select value from run_info where key = 'best_layer'").fetchone()
    names = ("layer", "r2_heldout", "weight_effect_agreement", "faithfulness_relative")
    layers = con.execute(f"select {', '.join(names)} from layers").fetchall()
    con.close()
    assert all(l[3] is not None for l in layers)  # chosen by faithfulness, not by R²
    expected = best_layer(dict(zip(names, l)) for l in layers)
    assert run.best_layer == expected and stored == (str(expected),)
    assert run.best_r2_heldout == pytest.approx(next(l[1] for l in layers if l[0] == expected))


def test_weight_groups_and_weight_effect_agreement_follow_from_the_stored_features(finished_run):
    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    for layer in (0, 2):
        w, e, fired = (np.array(c, dtype=float) for c in zip(*con.execute(
            "select weight, coalesce(reward_effect, 'nan'), frequency > 0 from features "
            "where layer = ? order by feature", [layer]).fetchall()))
        use = (fired > 0) & np.isfinite(e)
        stored = con.execute("select weight_effect_agreement from layers where layer = ?", [layer]).fetchone()[0]
        if np.ptp(e[use]) > 0:
            assert stored == pytest.approx(np.corrcoef(w[use], e[use])[0, 1])
        else:  # the last block: the head reads [CLS] only, so no text token moves the score
            assert stored is None and layer == 2
        # every group's members share one weight, and the group is named by its smallest member
        groups = con.execute("select weight_group, list(feature), list(distinct weight), any_value(weight_group_size) "
                             "from features where layer = ? group by weight_group", [layer]).fetchall()
        for group, members, weights, size in groups:
            assert group == min(members) and size == len(members) and len(weights) == 1


def test_pages_show_the_run_ordered_by_weight(finished_run):
    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    expected = [row[0] for row in con.execute(
        "select feature from features where layer = 2 order by weight desc, feature limit 10").fetchall()]
    with make_client(settings) as client:
        assert "Tiny Run" in client.get("/").text
        # by weight, as asked: the table's default is the layer's default ranking (test_web_causal.py)
        table = client.get("/api/runs/tiny-run/layers/2", params={"sort": "weight"}).json()
        got = [row["feature"] for row in table["features"]][:10]
        assert got == expected
        weights = [row["weight"] for row in table["features"]]
        assert weights == sorted(weights, reverse=True)
        html = client.get("/runs/tiny-run/layers/2?sort=weight").text
        assert html.index(f"/features/{expected[0]}?sort=weight\"") < html.index(f"/features/{expected[1]}?sort=weight\"")
        # unsorted, the table opens in the layer's measured default ranking; its curves are drawn
        stored_default = con.execute("select default_ranking from layers where layer = 2").fetchone()[0]
        assert client.get("/api/runs/tiny-run/layers/2").json()["sort"] == RANKINGS[stored_default].sort
        curves = client.get("/api/runs/tiny-run/layers/2/faithfulness").json()["rankings"]
        assert stored_default in curves and html.count('<g class="curve ') == sum(
            len(c["directions"]) for c in curves.values())

        top = expected[0]
        peak_token = con.execute(
            f"select tokens[position - window_start + 1] from contexts where layer=2 and feature={top} and rank=0"
        ).fetchone()[0]
        page = client.get(f"/runs/tiny-run/layers/2/features/{top}")
        assert page.status_code == 200
        assert peak_token.replace("##", "") in page.text
        twin = client.get(f"/api/runs/tiny-run/layers/2/features/{top}").json()
        stored_weight = con.execute(f"select weight from features where layer=2 and feature={top}").fetchone()[0]
        assert twin["feature"]["weight"] == pytest.approx(stored_weight)
        assert twin["contexts"][0]["tokens"][twin["contexts"][0]["position"] - twin["contexts"][0]["window_start"]] == peak_token


def test_failure_while_writing_leaves_nothing(tiny_world, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    config = tiny_config(*tiny_world, name="broken")
    real_insert = publish._insert

    def failing_insert(con, table, columns):
        if table == "contexts":
            raise OSError("disk full (simulated)")
        return real_insert(con, table, columns)

    monkeypatch.setattr(publish, "_insert", failing_insert)
    with pytest.raises(OSError, match="simulated"):
        run_pipeline(config, settings)
    runs_dir = settings.runs_dir
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == []
    with db.session(settings) as s:
        assert s.query(Run).count() == 0
    db.dispose_engines()


def test_existing_run_is_not_overwritten_without_replace(finished_run, tiny_world):
    from backend.core.run_config import ConfigError

    settings, run_dir = finished_run
    before = (run_dir / STORE_FILENAME).stat().st_mtime_ns
    with pytest.raises(ConfigError, match="already exists"):
        run_pipeline(tiny_config(*tiny_world), settings)
    assert (run_dir / STORE_FILENAME).stat().st_mtime_ns == before


def test_contexts_and_scores_point_at_the_right_texts(finished_run, tiny_world):
    """Texts are analysed in length order; every stored row must still name its own text."""
    import torch

    from workers.adapters import load_adapter

    settings, run_dir = finished_run
    adapter = load_adapter("seq_cls", str(tiny_world[0]), torch.device("cpu"), max_length=32)
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    contexts = con.execute(
        "select c.tokens, c.window_start, t.text, t.n_tokens from contexts c join texts t using (text_id) "
        "order by c.activation desc limit 25").fetchall()
    for tokens, start, text, n_tokens in contexts:
        full = adapter.tokenizer.convert_ids_to_tokens(adapter.tokenizer(text, truncation=True, max_length=32)["input_ids"])
        assert full[start : start + len(tokens)] == list(tokens)
        assert len(full) == n_tokens
    sample = con.execute("select text, score from texts where text_id in (3, 100, 201) order by text_id").fetchall()
    scores, _ = adapter.run(adapter.tokenize([text for text, _ in sample]))
    assert np.allclose(scores.numpy(), [score for _, score in sample], atol=1e-4)


def test_each_feature_ranks_the_texts_where_its_max_activation_is_largest(finished_run, tiny_world):
    """feature_texts against the SAE run again on every text: per feature, the texts with the
    largest max activation over the text's own tokens (special tokens left out), strongest first."""
    import torch
    from sae_lens import SAE

    from workers.adapters import load_adapter

    settings, run_dir = finished_run
    adapter = load_adapter("seq_cls", str(tiny_world[0]), torch.device("cpu"), max_length=32)
    special_ids = torch.tensor(adapter.tokenizer.all_special_ids)
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    texts = [text for (text,) in con.execute("select text from texts order by text_id").fetchall()]
    assert dict(con.execute("select key, value from run_info").fetchall())["ranked_texts"] == str(RANKED_TEXTS)
    checked_full = 0
    for layer in (0, 2):
        sae = SAE.load_from_disk(run_dir / "saes" / f"layer_{layer}").eval()
        maxima = []
        for start in range(0, len(texts), 32):
            batch = adapter.tokenize(texts[start:start + 32])
            with torch.no_grad():
                _, captured = adapter.run(batch, capture=[layer], need_score=False)
                codes = sae.encode(captured[layer].float())
            own = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special_ids)
            maxima.append((codes * own.unsqueeze(-1)).amax(dim=1))
        maxima = torch.cat(maxima).numpy()  # [text, feature]
        stored = con.execute("select feature, list(text_id order by rank), list(activation order by rank), "
                             "list(rank order by rank) from feature_texts where layer = ? group by feature",
                             [layer]).fetchall()
        assert {f for f, *_ in stored} == set(np.flatnonzero(maxima.max(axis=0) > 0))  # every feature that fires
        for feature, text_ids, activations, ranks in stored:
            column = maxima[:, feature]
            firing = int((column > 0).sum())
            assert ranks == list(range(min(firing, RANKED_TEXTS)))
            assert text_ids[0] == int(np.argmax(column))  # the top text is the one it fires on most
            np.testing.assert_allclose(activations, np.sort(column)[::-1][:len(ranks)], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(column[text_ids], activations, rtol=1e-4, atol=1e-5)
            checked_full += firing > RANKED_TEXTS
    assert checked_full > 0  # some feature fires on more texts than are kept, so the cut was tested


def test_causal_columns_measured_and_the_default_ranking_is_the_curve_that_moves_most(finished_run):
    from backend.core.rankings import RANKINGS
    from workers.faithfulness import default_ranking

    settings, run_dir = finished_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    for layer, stored_default, n_measured in con.execute(
            "select layer, default_ranking, n_measured from layers").fetchall():
        rows = [dict(zip([d[0] for d in con.description], r)) for r in
                con.execute("select * from faithfulness where layer = ?", [layer]).fetchall()]
        assert {r["ranking"] for r in rows} <= set(RANKINGS) and {r["n"] for r in rows} <= {1, 2, 5, 10, 20}
        assert stored_default == default_ranking(rows)
        for r in rows:  # the point each direction is summarised by (n = 10, or the largest below) has 10 draws
            summary_n = max(o["n"] for o in rows if (o["ranking"], o["direction"]) == (r["ranking"], r["direction"])
                            and o["n"] <= 10)
            assert len(r["control_draw_means"]) == (10 if r["n"] == summary_n else 3) and r["n_reads"] > 0
        assert all(r["direction"] == ("both" if r["ranking"] == "abs_weight" else r["direction"]) for r in rows)
        assert {r["direction"] for r in rows} <= {"raises", "lowers", "both"}
        measured = con.execute("select count(*), min(measured_n) from features where layer = ? and "
                               "measured_delta is not null", [layer]).fetchone()
        assert measured[0] == n_measured > 10 and measured[1] > 0
        # dead features have no attribution; live ones that fired on gradient texts do
        dead = con.execute("select count(*) from features where layer = ? and frequency = 0 and attribution "
                           "is not null", [layer]).fetchone()[0]
        assert dead == 0
    con.close()
