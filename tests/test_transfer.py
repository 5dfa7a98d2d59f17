"""Base-model transfer and layer choice by parameter divergence (issue 15, deliverables 1 and 2),
on tiny real BERTs: the reward model, and a "base" whose blocks differ from it by known amounts."""
from __future__ import annotations

import json

import duckdb
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from backend.core import db
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import make_client
from tests.tiny_models import save_tiny_bert
from backend.core.run_config import ConfigError, parse_config
from workers.divergence import parameter_divergence
from workers.pipeline import run_pipeline
from backend.web.routes.formats import fmt_num

N_FEATURES = 32
N_LAYERS = 3
SHIFT = {0: 0.01, 1: 0.3, 2: 0.05}  # every weight of block b of the base moved by this much (times noise)


def tiny_config(model_path, dataset_path, **overrides):
    data = {
        "name": "Transfer Run",
        "model": {"path": str(model_path), "max_length": 32},
        "dataset": {"source": str(dataset_path), "batch_size": 32},
        "layers": [0, 2],
        "sae": {"width": N_FEATURES, "k": 4, "training_tokens": 4096, "batch_size": 256, "buffer_tokens": 1024},
        "analysis": {"n_contexts": 3, "ranked_texts": 10},
        "regression": {"pooling": "mean"},
        "effects": {"enabled": False},
        **overrides,
    }
    return parse_config(data)


def save_base(rm_path, out, shift=SHIFT, seed=1):
    """The RM's backbone saved as a bare BertModel (no "bert." prefix, no head), block b's weights
    moved by shift[b] x standard normal noise: how far each block is from the RM is known."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(rm_path)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("encoder.layer."):
                block = int(name.split(".")[2])
                p.add_(shift[block] * torch.randn(p.shape, generator=generator))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(rm_path).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    rm = save_tiny_bert(root / "rm", n_layers=N_LAYERS)
    base = save_base(rm, root / "base")
    from workers.demo_corpus import generate_corpus, vader_reward

    dataset = root / "reviews.jsonl"
    with dataset.open("w") as f:
        for text in generate_corpus(240, seed=7):
            f.write(json.dumps({"text": text, "reward": vader_reward(text)}) + "\n")
    return root, rm, base, dataset


def test_divergence_per_block_is_the_hand_computed_l2_distance(world):
    _, rm, base, _ = world
    tuned, raw = load_file(str(rm / "model.safetensors")), load_file(str(base / "model.safetensors"))
    got = parameter_divergence(str(base), str(rm), N_LAYERS)
    assert got.blocks == [0, 1, 2] and got.block_prefix == "encoder.layer"
    for b in range(N_LAYERS):
        names = [n for n in raw if n.startswith(f"encoder.layer.{b}.")]
        diff = sum(float(((tuned["bert." + n].double() - raw[n].double()) ** 2).sum()) for n in names)
        norm = sum(float((raw[n].double() ** 2).sum()) for n in names)
        assert got.l2[b] == pytest.approx(np.sqrt(diff), rel=1e-9)
        assert got.relative[b] == pytest.approx(np.sqrt(diff) / np.sqrt(norm), rel=1e-9)
        assert got.n_tensors[b] == len(names) > 0
    # the RM's head is in one model only; everything else was compared
    assert "classifier.weight" in got.skipped and got.n_compared == len(raw) - ("embeddings.position_ids" in raw)
    assert got.top(1) == [1] and got.top(2) == [1, 2]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    root, rm, base, dataset = world
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"))
    config = tiny_config(rm, dataset, layers={"top_divergence": 2},
                         transfer={"base_model": str(base), "training_tokens": 2048, "match_tokens": 1024})
    stages: list[str] = []
    run_dir = run_pipeline(config, settings, on_stage=stages.append)
    yield settings, run_dir, stages
    db.dispose_engines()


def test_top_divergence_picks_the_most_changed_blocks_and_the_run_keeps_what_was_written(finished):
    settings, run_dir, stages = finished
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    assert [r[0] for r in con.execute("select layer from layers order by layer").fetchall()] == [1, 2]
    rows = con.execute("select block, l2, relative, n_tensors, chosen from divergence order by block").fetchall()
    assert [r[0] for r in rows] == [0, 1, 2] and [r[4] for r in rows] == [False, True, True]
    assert rows[1][1] > rows[2][1] > rows[0][1] > 0  # the shifts: 0.3 > 0.05 > 0.01
    config_yaml = con.execute("select value from run_info where key = 'config_yaml'").fetchone()[0]
    assert "top_divergence: 2" in config_yaml
    assert any("parameter divergence" in s and "chosen by top_divergence 2: [1, 2]" in s for s in stages)


def test_the_run_writes_the_transfer_table_and_feature_columns(finished):
    settings, run_dir, stages = finished
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    rows = con.execute("select t.layer, t.base_r2_heldout, t.base_probe_r2_heldout, t.rm_r2_heldout, l.r2_heldout, "
                       "t.n_matched, t.n_matched_above_0_5, t.base_sae_path from transfer_layers t "
                       "join layers l using (layer) order by layer").fetchall()
    assert [r[0] for r in rows] == [1, 2]
    for layer, base_r2, probe_r2, rm_r2, own_r2, n_matched, above, sae_path in rows:
        # every text used (no transfer.texts): the RM's R² beside the base's is its layer's own
        assert np.isfinite(base_r2) and np.isfinite(probe_r2) and rm_r2 == pytest.approx(own_r2)
        assert 0 < n_matched <= N_FEATURES and 0 <= above <= n_matched
        assert (run_dir / sae_path / "cfg.json").is_file() and sae_path.startswith("base/")
    matched = con.execute("select layer, count(base_feature), count(base_correlation), count(base_decoder_cosine), "
                          "max(abs(base_correlation)) from features group by layer order by layer").fetchall()
    assert [m[0] for m in matched] == [1, 2]
    assert all(m[1] == m[2] == m[3] == dict((r[0], r[5]) for r in rows)[m[0]] and m[4] <= 1 for m in matched)
    for stage in ("transfer: training 2 SAEs on the base model", "transfer: base SAEs trained in",
                  "transfer: regressions in", "transfer: features matched over"):
        assert any(s.startswith(stage) for s in stages), stage


def test_reads_line_up_by_text_whatever_order_each_model_read_them_in():
    from workers.analyses.transfer import aligned_reads, regression_texts

    subset = regression_texts(10, 4, seed=3)
    assert len(subset) == 4 and list(subset) == sorted(set(subset)) and subset.max() < 10
    assert list(regression_texts(10, None, 0)) == list(range(10)) == list(regression_texts(10, 50, 0))
    # the RM read all 10 texts, two reads each (a process RM's steps), in its own batch order
    rm_texts = np.repeat(np.random.default_rng(0).permutation(10), 2)
    base_texts = np.repeat(subset[::-1], 2)  # the base read only the subset, in another order
    base_rows, rm_rows = aligned_reads(base_texts, rm_texts, subset)
    assert list(base_texts[base_rows]) == list(rm_texts[rm_rows]) == list(np.repeat(subset, 2))
    # a text's reads keep their order: its first read lines up with the other model's first
    assert all(rm_rows[i] < rm_rows[i + 1] for i in range(0, len(rm_rows), 2))
    with pytest.raises(RuntimeError, match="do not line up"):
        aligned_reads(np.repeat(subset, 3), rm_texts, subset)  # a model that reads each text three times


def test_a_sample_of_texts_fits_base_and_rm_on_the_same_reads(world, tmp_path):
    root, rm, base, dataset = world
    settings = Settings(data_dir=tmp_path / "data")
    config = tiny_config(rm, dataset, name="Transfer Sample", layers=[1, 2],
                         transfer={"base_model": str(base), "training_tokens": 2048, "match_tokens": 512,
                                   "texts": 120})
    stages: list[str] = []
    run_dir = run_pipeline(config, settings, on_stage=stages.append)
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    rows = con.execute("select t.n_texts, t.base_r2_heldout, t.rm_r2_heldout, l.r2_heldout, t.rm_probe_r2_heldout "
                       "from transfer_layers t join layers l using (layer) order by layer").fetchall()
    assert [r[0] for r in rows] == [120, 120]
    # the RM refitted on the sample: its R² there is not its layer's (fitted on all 240 texts)
    assert all(np.isfinite(r[1]) and np.isfinite(r[2]) and np.isfinite(r[4]) and r[2] != r[3] for r in rows)
    assert any("pooling their features over 120 texts" in s for s in stages)
    with make_client(settings) as client:
        page = client.get("/runs/transfer-sample").text
        assert "fitted and scored on the same 120 corpus texts" in page and "a seeded sample of the 240" in page
    db.dispose_engines()


def test_each_match_is_the_base_feature_most_correlated_over_the_held_out_tokens(finished, world):
    """Recomputed from scratch: HF hidden states of both models, the stored SAEs, numpy's corrcoef."""
    from sae_lens import SAE
    from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

    from workers.analyses.transfer import matching_texts

    _, rm_path, base_path, _ = world
    settings, run_dir, _ = finished
    con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
    texts, splits = zip(*con.execute("select text, split from texts order by text_id").fetchall())
    tokenizer = AutoTokenizer.from_pretrained(rm_path)
    chosen = matching_texts(list(texts), np.array(splits) == "heldout", tokenizer, 32, 1024, 0)
    enc = tokenizer(chosen, padding=True, truncation=True, max_length=32, return_tensors="pt")
    own = enc["attention_mask"].bool() & ~torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids))
    with torch.no_grad():
        rm_hidden = BertForSequenceClassification.from_pretrained(rm_path)(**enc, output_hidden_states=True).hidden_states
        base_hidden = BertModel.from_pretrained(base_path)(**enc, output_hidden_states=True).hidden_states
    for layer in (1, 2):
        rm_sae = SAE.load_from_disk(str(run_dir / "saes" / f"layer_{layer}"))
        base_sae = SAE.load_from_disk(str(run_dir / "base" / "saes" / f"layer_{layer}"))
        with torch.no_grad():
            a = rm_sae.encode(rm_hidden[layer + 1][own]).double().numpy()
            b = base_sae.encode(base_hidden[layer + 1][own]).double().numpy()
        r = np.corrcoef(a.T, b.T)[:N_FEATURES, N_FEATURES:]
        stored = con.execute("select feature, base_feature, base_correlation, base_decoder_cosine from features "
                             "where layer = ? order by feature", [layer]).fetchall()
        checked = 0
        for feature, base_feature, correlation, cosine in stored:
            if a[:, feature].std() == 0:
                assert base_feature is None
                continue
            best = np.nanmax(r[feature])
            assert correlation == pytest.approx(best, abs=2e-4)
            assert r[feature, base_feature] == pytest.approx(best, abs=2e-4)
            da, db = rm_sae.W_dec[feature].detach().double(), base_sae.W_dec[base_feature].detach().double()
            assert cosine == pytest.approx(float(da @ db / (da.norm() * db.norm())), abs=1e-5)
            checked += 1
        assert checked >= N_FEATURES // 2


def test_the_run_page_and_its_json_show_the_transfer_and_divergence_sections(finished):
    settings, run_dir, _ = finished
    with make_client(settings) as client:
        data = client.get("/api/runs/transfer-run").json()
        assert [row["layer"] for row in data["transfer"]["layers"]] == [1, 2]
        assert data["transfer"]["base_model"].endswith("base")
        assert [row["block"] for row in data["divergence"]["blocks"]] == [0, 1, 2]
        assert data["divergence"]["chosen"] == [1, 2] and data["divergence"]["tensors_compared"] > 0
        page = client.get("/runs/transfer-run").text
        assert 'id="transfer-chart"' in page and 'id="divergence-chart"' in page
        assert page.count('class="divergence-bar chosen"') == 2 and 'data-transfer-layer="2"' in page
        r2 = data["transfer"]["layers"][1]["base_r2_heldout"]
        assert fmt_num(r2) in page
        con = duckdb.connect(str(run_dir / STORE_FILENAME), read_only=True)
        feature, base_feature = con.execute("select feature, base_feature from features where layer = 2 and "
                                            "base_feature is not null order by feature limit 1").fetchone()
        html = client.get(f"/runs/transfer-run/layers/2/features/{feature}").text
        assert f"in the base model: feature <b>{base_feature}</b> of layer 2" in html
        card = client.get(f"/api/runs/transfer-run/layers/2/features/{feature}").json()["feature"]
        assert card["base_feature"] == base_feature
        table = client.get("/api/runs/transfer-run/layers/2", params={"sort": "base_correlation"}).json()
        values = [row["base_correlation"] for row in table["features"] if row["base_correlation"] is not None]
        assert values == sorted(values, reverse=True) and len(values) > 1
        sorted_page = client.get("/runs/transfer-run/layers/2?sort=base_correlation")
        first, second = (row["feature"] for row in table["features"][:2])
        assert sorted_page.status_code == 200
        assert (sorted_page.text.index(f"/features/{first}?sort=base_correlation\"")
                < sorted_page.text.index(f"/features/{second}?sort=base_correlation\""))


def _other_tokenizer(out):
    """A tiny BERT with a WordPiece vocabulary of its own: not the RM's tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "a"]
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(out)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    return out


def test_bad_transfer_input_is_refused_before_any_compute(world, tmp_path):
    from backend.core.run_config import check_config

    root, rm, base, dataset = world
    settings = Settings(data_dir=tmp_path / "data")
    stages: list[str] = []
    other = _other_tokenizer(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"transfer.base_model: .* has another tokenizer than the reward model: "
                                          r"[0-9,]+ of the reward model's"):
        run_pipeline(tiny_config(rm, dataset, transfer={"base_model": str(other)}), settings, on_stage=stages.append)
    assert not any("training" in s for s in stages) and not any(settings.runs_dir.glob("*/saes"))
    # the base model lacks the layer: known from its config.json before anything loads
    shallow = tmp_path / "shallow"
    save_base(save_tiny_bert(tmp_path / "rm2", n_layers=2), shallow, shift={0: 0.1, 1: 0.1})
    with pytest.raises(ConfigError, match=r"transfer.layers: the base model .* has no block 2 \(2 blocks: 0..1\)"):
        run_pipeline(tiny_config(rm, dataset, transfer={"base_model": str(shallow)}), settings, on_stage=stages.append)
    with pytest.raises(ConfigError, match="has no block 7"):
        check_config(tiny_config(rm, dataset, transfer={"base_model": str(base), "layers": [7]}), settings)
    assert not any("training" in s for s in stages)
    # top_divergence: needs a base model, and no more blocks than the model has
    with pytest.raises(ConfigError, match=r"layers: \{top_divergence: k\} needs transfer.base_model"):
        tiny_config(rm, dataset, layers={"top_divergence": 2})
    with pytest.raises(ConfigError, match=r"layers.top_divergence: 4 is more than the model's 3 blocks"):
        check_config(tiny_config(rm, dataset, layers={"top_divergence": 4}, transfer={"base_model": str(base)}),
                     settings)
    with pytest.raises(ConfigError, match=r"layers.selection.top_divergence: .*greater than or equal to 1"):
        tiny_config(rm, dataset, layers={"top_divergence": 0}, transfer={"base_model": str(base)})
