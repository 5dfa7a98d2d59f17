"""Paired dictionaries (sae.widths) and their MMCS: the computation on constructed decoders, a
tiny real run with widths, the config's refusals, and the pages (filter, feature line, run section)."""
from __future__ import annotations

import re

import duckdb
import numpy as np
import pytest
import torch

from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import LAYERS, N_FEATURES, PAIR_WIDTH, make_client, pair_cosine
from workers.analyses.pairs import max_cosines, mmcs
from backend.core.run_config import ConfigError, parse_config
from backend.web.routes.formats import fmt_num

RUN = "/runs/synthetic"


# --- MMCS on constructed decoders ------------------------------------------------------------

def test_identical_dictionaries_have_mmcs_one_both_ways_and_each_row_finds_itself():
    d = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    scaled = d * torch.linspace(0.1, 5, 40).unsqueeze(1)  # lengths do not matter: cosines
    a_max, a_arg, b_max, b_arg = max_cosines(d, scaled)
    assert torch.allclose(a_max, torch.ones(40), atol=1e-5) and torch.allclose(b_max, torch.ones(40), atol=1e-5)
    assert a_arg.tolist() == list(range(40)) and b_arg.tolist() == list(range(40))
    assert mmcs(d, scaled) == pytest.approx((1.0, 1.0), abs=1e-5)


def test_a_permuted_subset_matches_all_of_itself_and_only_part_of_the_larger():
    eye = torch.eye(8)  # eight orthogonal directions
    perm = [5, 2, 7]
    small = eye[perm] * 3
    to_large, from_large = mmcs(small, eye)
    assert to_large == pytest.approx(1.0)  # every small row is one of the large rows
    assert from_large == pytest.approx(3 / 8)  # 3 of the 8 large rows are matched (1), the rest orthogonal (0)
    _, arg, _, _ = max_cosines(small, eye)
    assert arg.tolist() == perm


def test_orthogonal_dictionaries_have_mmcs_zero_and_a_hand_computed_pair():
    a, b = torch.eye(6)[:3], torch.eye(6)[3:]
    assert mmcs(a, b) == pytest.approx((0.0, 0.0))
    # by hand: a = [(1,0), (0,1)], b = [(1,1)/sqrt2 scaled, (1,0)]: a0 -> max(0.7071, 1) = 1, a1 -> 0.7071;
    # b0 -> max(0.7071, 0.7071) = 0.7071, b1 -> 1
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0], [0.5, 0.0]])
    r = 2 ** -0.5
    assert mmcs(a, b) == pytest.approx(((1 + r) / 2, (r + 1) / 2))
    # a negative cosine is not similarity: the max keeps the largest signed cosine
    assert mmcs(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]]))[0] == pytest.approx(0.0)


def test_a_zero_row_has_cosine_zero_not_nan():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    a_max, _, b_max, _ = max_cosines(a, torch.tensor([[1.0, 0.0]]))
    assert a_max.tolist() == [0.0, 1.0] and b_max.tolist() == [1.0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1000])
def test_chunked_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(101, 16, generator=g), torch.randn(37, 16, generator=g)
    full = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    a_max, a_arg, b_max, b_arg = max_cosines(a, b, chunk=chunk)
    assert torch.allclose(a_max, full.max(dim=1).values, atol=1e-6)
    assert torch.allclose(b_max, full.max(dim=0).values, atol=1e-6)
    assert a_arg.tolist() == full.argmax(dim=1).tolist() and b_arg.tolist() == full.argmax(dim=0).tolist()
    assert mmcs(a, b, chunk=chunk) == pytest.approx(mmcs(a, b), abs=1e-6)


def test_directions_of_different_widths_are_refused():
    with pytest.raises(ValueError, match="dimensions"):
        max_cosines(torch.ones(2, 3), torch.ones(2, 4))


# --- the config ------------------------------------------------------------------------------

BASE = {"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}


def test_widths_make_the_larger_the_run_sae_and_the_smaller_its_pair():
    sae = parse_config({**BASE, "sae": {"widths": [3072, 768]}}).sae
    assert (sae.width, sae.widths, sae.pair_width) == (3072, [768, 3072], 768)
    assert parse_config({**BASE, "sae": {"widths": [768, 3072], "width": 3072}}).sae.width == 3072
    assert parse_config(BASE).sae.pair_width is None


@pytest.mark.parametrize("sae, message", [
    ({"widths": [768]}, "widths that are not two distinct sizes"),
    ({"widths": [768, 768]}, "widths that are not two distinct sizes"),
    ({"widths": [64, 128, 256]}, "widths that are not two distinct sizes"),
    ({"widths": []}, "widths that are not two distinct sizes"),
    ({"widths": [4, 3072]}, "at least 8"),
    ({"widths": [768, 3072], "width": 768}, "must be the larger of sae.widths"),
    ({"widths": [16, 64], "k": 32}, "must not exceed the smaller of sae.widths (16)"),
    ({"widths": "768,3072"}, "sae.widths"),
])
def test_bad_widths_are_refused_before_compute(sae, message):
    with pytest.raises(ConfigError) as err:
        parse_config({**BASE, "sae": sae})
    assert message in str(err.value)


# --- a tiny real run with widths -------------------------------------------------------------

@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    import json

    from backend.core import db
    from tests.test_pipeline import tiny_config
    from tests.tiny_models import save_tiny_bert
    from workers.demo_corpus import generate_corpus, vader_reward
    from workers.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("pairs")
    model = save_tiny_bert(root / "tiny-bert")
    dataset = root / "reviews.jsonl"
    with dataset.open("w") as f:
        for text in generate_corpus(160, seed=3):
            f.write(json.dumps({"text": text, "reward": vader_reward(text)}) + "\n")
    config = tiny_config(model, dataset, sae={"widths": [16, 64], "k": 4, "training_tokens": 4096, "batch_size": 256,
                                              "buffer_tokens": 1024},
                         effects={"candidates": 4, "texts_per_feature": 4, "pool_texts": 16, "faithfulness_texts": 8,
                                  "faithfulness_n": [1, 2]})
    settings = Settings(data_dir=root / "data")
    stages: list[str] = []
    run_dir = run_pipeline(config, settings, on_stage=stages.append)
    yield settings, run_dir, stages, (model, dataset)
    db.dispose_engines()


def test_a_run_with_widths_saves_both_saes_and_writes_the_mmcs_columns(paired_run):
    from sae_lens import SAE

    from workers.analyses.pairs import unit_rows

    settings, run_dir, stages, _ = paired_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    layers = con.execute("select layer, d_sae, pair_width, pair_sae_path, mmcs_to_pair, mmcs_from_pair "
                         "from layers order by layer").fetchall()
    assert [row[0] for row in layers] == [0, 2]
    for layer, d_sae, pair_width, pair_path, to_pair, from_pair in layers:
        assert (d_sae, pair_width, pair_path) == (64, 16, f"saes/pair/layer_{layer}_w16")
        main = SAE.load_from_disk(run_dir / "saes" / f"layer_{layer}")
        pair = SAE.load_from_disk(run_dir / pair_path)
        assert (main.cfg.d_sae, pair.cfg.d_sae) == (64, 16)
        assert pair.cfg.metadata.hook_name == main.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        # recomputed from the saved decoders, in full
        cos = unit_rows(main.W_dec.detach()) @ unit_rows(pair.W_dec.detach()).T
        stored = con.execute("select feature, pair_max_cosine, pair_feature from features where layer = ? "
                             "order by feature", [layer]).fetchall()
        assert [r[0] for r in stored] == list(range(64))
        np.testing.assert_allclose([r[1] for r in stored], cos.max(dim=1).values.numpy(), atol=1e-5)
        assert [r[2] for r in stored] == cos.argmax(dim=1).tolist()
        assert to_pair == pytest.approx(float(cos.max(dim=1).values.mean()), abs=1e-5)
        assert from_pair == pytest.approx(float(cos.max(dim=0).values.mean()), abs=1e-5)
        assert 0 < to_pair < 1 and 0 < from_pair < 1  # two dictionaries trained apart: related, not equal
    assert any(re.search(r"layer 2: MMCS with the 16-wide pair \d\.\d{3}", s) for s in stages)


def test_the_pair_trains_on_the_same_batches_and_leaves_the_run_sae_as_without_widths(paired_run, tmp_path):
    """train_saes with and without widths: the run SAEs come out identical (the pairs draw their
    initialisation from their own seed, so the shuffle's order is unchanged), the pairs differ."""
    from sae_lens import SAE

    from tests.test_pipeline import tiny_config
    from workers.adapters import adapter_from_config
    from workers.datasets import read_texts
    from workers.train import pair_dir, train_saes

    _, _, _, (model, dataset) = paired_run
    sae = {"k": 4, "training_tokens": 2048, "batch_size": 256, "buffer_tokens": 1024}
    plain = tiny_config(model, dataset, sae={**sae, "width": 64})
    paired = tiny_config(model, dataset, sae={**sae, "widths": [16, 64]})
    texts, _ = read_texts(plain.dataset, plain.seed, plain.model.step_separator)
    adapter = adapter_from_config(plain.model, str(model), torch.device("cpu"))
    torch.set_num_threads(1)  # one thread: sums in the same order both times
    paths_plain = train_saes(plain, adapter, texts[:100], tmp_path / "plain")
    paths_paired = train_saes(paired, adapter, texts[:100], tmp_path / "paired")
    for layer in (0, 2):
        a = SAE.load_from_disk(paths_plain[layer]).W_dec.detach()
        b = SAE.load_from_disk(paths_paired[layer]).W_dec.detach()
        assert torch.equal(a, b)
        pair = SAE.load_from_disk(pair_dir(tmp_path / "paired", layer, 16))
        assert pair.cfg.d_sae == 16
        assert not (tmp_path / "plain" / "saes" / "pair").exists()


def test_a_run_with_widths_shows_the_pair_on_its_pages(paired_run):
    settings, run_dir, _, _ = paired_run
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    cosine, partner = con.execute("select pair_max_cosine, pair_feature from features where layer = 2 and feature = 3"
                                  ).fetchone()
    with make_client(settings) as client:
        page = client.get("/runs/tiny-run/layers/2/features/3").text
        assert f"max cosine in the 16-wide dictionary: <b>{fmt_num(cosine)}</b> (its feature {partner})" in page
        run = client.get("/api/runs/tiny-run").json()
        assert [row["layer"] for row in run["mmcs"]["layers"]] == [0, 2]


# --- the pages, on the synthetic store ---------------------------------------------------------

def synthetic_cosines(tables, layer):
    f = tables["features"]
    return {f["feature"][i]: f["pair_max_cosine"][i] for i in range(len(f["layer"])) if f["layer"][i] == layer}


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 1.0])
def test_the_present_in_both_filter_keeps_exactly_the_features_at_or_above_the_threshold(client, synthetic_run,
                                                                                          threshold):
    cosines = synthetic_cosines(synthetic_run, 3)
    expected = {f for f, c in cosines.items() if c >= threshold}
    api = client.get(f"/api{RUN}/layers/3", params={"min_pair_cosine": threshold, "sort": "pair_cosine"}).json()
    assert api["total"] == len(expected)
    ids = [f["feature"] for f in api["features"]]
    assert set(ids) <= expected and ids == sorted(ids, key=lambda f: (-cosines[f], f))
    if threshold == 0.5:
        assert 0 < len(expected) < N_FEATURES  # it narrows the table
    html = client.get(f"{RUN}/layers/3", params={"min_pair_cosine": threshold}).text
    rows = [int(x) for x in re.findall(r'<tr data-feature="(\d+)"', html)]
    assert set(rows) <= expected and len(rows) == min(len(expected), 50)
    assert 'name="min_pair_cosine"' in html and "Present in both dictionaries" in html


def test_the_layer_table_has_the_pair_cosine_column(client, synthetic_run):
    html = client.get(f"{RUN}/layers/3", params={"sort": "pair_cosine"}).text
    assert "Pair cos." in html
    first = re.search(r'<tr data-feature="(\d+)">(.*?)</tr>', html, re.S)
    best = max(synthetic_cosines(synthetic_run, 3).items(), key=lambda kv: (kv[1], -kv[0]))
    assert int(first.group(1)) == best[0] and 'pair-cosine' in first.group(2) and fmt_num(best[1]) in first.group(2)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "high"])
def test_a_bad_threshold_is_422_naming_it(client, value):
    api = client.get(f"/api{RUN}/layers/3?min_pair_cosine={value}")
    assert api.status_code == 422 and "min_pair_cosine" in str(api.json()["detail"])
    assert client.get(f"{RUN}/layers/3?min_pair_cosine={value}").status_code == 422


def test_the_feature_page_says_its_max_cosine_in_the_pair(client, synthetic_run):
    f = 9
    cosine = pair_cosine(f, 0)
    html = client.get(f"{RUN}/layers/3/features/{f}").text
    assert f"max cosine in the {PAIR_WIDTH}-wide dictionary: <b>{fmt_num(cosine)}</b> (its feature {f % PAIR_WIDTH})" in html
    data = client.get(f"/api{RUN}/layers/3/features/{f}").json()["feature"]
    assert data["pair_max_cosine"] == pytest.approx(cosine) and data["pair_feature"] == f % PAIR_WIDTH
    assert data["pair_width"] == PAIR_WIDTH


def test_the_run_page_has_the_mmcs_section_and_its_json(client, synthetic_run):
    data = client.get(f"/api{RUN}").json()["mmcs"]
    assert [row["layer"] for row in data["layers"]] == list(LAYERS)
    layers = synthetic_run["layers"]
    for i, row in enumerate(data["layers"]):
        assert row["mmcs_to_pair"] == pytest.approx(layers["mmcs_to_pair"][i])
        assert row["mmcs_from_pair"] == pytest.approx(layers["mmcs_from_pair"][i])
        assert row["pair_width"] == PAIR_WIDTH
        cosines = synthetic_cosines(synthetic_run, row["layer"]).values()
        assert [p["n_features"] for p in row["present_in_both"]] == [sum(c >= t for c in cosines)
                                                                    for t in data["thresholds"]]
        # the synthetic mmcs_to_pair is the mean of the stored cosines, as the pipeline's is
        assert row["mmcs_to_pair"] == pytest.approx(sum(cosines) / len(cosines))
    html = client.get(RUN).text
    assert 'id="mmcs-chart"' in html and 'id="mmcs-table"' in html
    table = html[html.index('id="mmcs-table"'):]
    for row in data["layers"]:
        assert f'data-mmcs-layer="{row["layer"]}"' in table
        assert fmt_num(row["mmcs_to_pair"]) in table and fmt_num(row["mmcs_from_pair"]) in table
    assert "?min_pair_cosine=0.9&amp;sort=pair_cosine" in table


def test_a_run_without_pairs_has_no_mmcs_section(migrated, monkeypatch):
    import tests.helpers as helpers

    tables = helpers.synthetic_tables()
    for name in ("pair_width", "pair_sae_path", "mmcs_to_pair", "mmcs_from_pair"):
        tables["layers"][name] = [None] * len(tables["layers"][name])
    for name in ("pair_max_cosine", "pair_feature"):
        tables["features"][name] = [None] * len(tables["features"][name])
    monkeypatch.setattr(helpers, "synthetic_tables", lambda causal=True: tables)  # the store as a run without widths
    helpers.publish_synthetic_run(migrated, run_id="nopairs")
    with make_client(migrated) as client:
        assert client.get("/api/runs/nopairs").json()["mmcs"] is None
        assert 'id="mmcs' not in client.get("/runs/nopairs").text
        html = client.get("/runs/nopairs/layers/3").text
        assert "Pair cos." not in html and 'name="min_pair_cosine"' not in html
        assert "-wide dictionary" not in client.get("/runs/nopairs/layers/3/features/4").text
