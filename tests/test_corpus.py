"""The corpus browser's store query (backend/core/store.py corpus) on a synthetic store, and the
running top-N of texts per feature (workers/ranked_texts.py) against brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.core import store
from backend.core.store_schema import STORE_FILENAME
from tests.helpers import CONTEXT_FEATURE, DEAD_FEATURE, RANKED_TEXTS, spec_columns, synthetic_tables
from workers.publish import write_store
from workers.ranked_texts import RankedTexts, per_text_maxima

# id, split, text, score, reward (None: the dataset has none for it)
TEXTS = [
    (0, "train", "A 100% great film", 0.9, 0.5),
    (1, "train", "100 percent great", 0.1, None),
    (2, "train", "snake_case is a plot twist", -0.4, -0.2),
    (3, "heldout", "snakeXcase is no plot", 0.7, 0.8),
    (4, "heldout", "GREAT acting, dull PLOT", -0.9, 0.1),
    (5, "train", "nothing to see", 0.3, -0.7),
    (6, "heldout", "Plot, plot and more plot", 0.0, 0.0),
]
LAYER = 3


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    tables = synthetic_tables()
    tables["texts"] = spec_columns("texts", [
        dict(text_id=i, split=split, text=text, score=score, reward=reward, n_tokens=5 + i, reward_position=0,
             response_start=None, response_end=None)
        for i, split, text, score, reward in TEXTS])
    # feature 7 of layer 3 ranks four texts; feature 8 ranks none
    ranked = [(4, 2.5), (0, 2.0), (6, 1.5), (3, 0.25)]
    tables["feature_texts"] = spec_columns("feature_texts", [
        dict(layer=LAYER, feature=CONTEXT_FEATURE, rank=rank, text_id=text_id, activation=act)
        for rank, (text_id, act) in enumerate(ranked)])
    return write_store(tmp_path_factory.mktemp("corpus") / STORE_FILENAME, {"run_id": "corpus"}, tables)


def ids(page: store.CorpusPage) -> list[int]:
    return [row["text_id"] for row in page.rows]


def test_substring_search_is_case_blind_and_literal(path):
    assert ids(store.corpus(path, contains="great", sort="text_id")) == [0, 1, 4]
    assert ids(store.corpus(path, contains="PLOT", sort="text_id")) == [2, 3, 4, 6]
    # '%' and '_' are the characters typed, not LIKE's wildcards
    assert ids(store.corpus(path, contains="100%", sort="text_id")) == [0]
    assert ids(store.corpus(path, contains="%", sort="text_id")) == [0]
    assert ids(store.corpus(path, contains="snake_case", sort="text_id")) == [2]
    assert ids(store.corpus(path, contains="_", sort="text_id")) == [2]
    assert store.corpus(path, contains="it's").total == 0  # a quote is bound, never formatted into SQL
    assert store.corpus(path, contains="'; DROP TABLE texts; --").total == 0
    assert store.corpus(path).total == len(TEXTS)


def test_split_and_score_range_filter(path):
    assert ids(store.corpus(path, split="heldout", sort="text_id")) == [3, 4, 6]
    assert ids(store.corpus(path, split="train", sort="text_id")) == [0, 1, 2, 5]
    # the range is inclusive at both ends
    assert ids(store.corpus(path, score_min=0.0, score_max=0.7, sort="text_id")) == [1, 3, 5, 6]
    assert ids(store.corpus(path, score_min=0.75, sort="text_id")) == [0]
    assert ids(store.corpus(path, score_max=-0.4, sort="text_id")) == [2, 4]
    both = store.corpus(path, contains="plot", split="heldout", score_min=-0.5, sort="text_id")
    assert ids(both) == [3, 6] and both.total == 2
    with pytest.raises(ValueError, match="unknown split 'test'"):
        store.corpus(path, split="test")


def test_each_sort_orders_the_texts(path):
    by = {i: (score, reward) for i, _, _, score, reward in TEXTS}
    assert ids(store.corpus(path)) == sorted(by, key=lambda i: -by[i][0])  # score, high first: the default
    assert ids(store.corpus(path, sort="-score")) == sorted(by, key=lambda i: by[i][0])
    assert ids(store.corpus(path, sort="text_id")) == sorted(by)
    with_reward = [i for i in by if by[i][1] is not None]
    # ties (texts 1 and 6 have no reward / a zero reward) by text id; a missing reward last either way
    assert ids(store.corpus(path, sort="reward")) == sorted(with_reward, key=lambda i: (-by[i][1], i)) + [1]
    assert ids(store.corpus(path, sort="-reward")) == sorted(with_reward, key=lambda i: (by[i][1], i)) + [1]
    row = store.corpus(path, sort="text_id", limit=1).rows[0]
    assert row == {"text_id": 0, "split": "train", "text": "A 100% great film", "score": 0.9, "reward": 0.5,
                   "n_tokens": 5}
    with pytest.raises(ValueError, match="unknown sort 'length'"):
        store.corpus(path, sort="length")


def test_feature_sort_lists_the_ranked_texts_strongest_first(path):
    page = store.corpus(path, sort="feature", layer=LAYER, feature=CONTEXT_FEATURE)
    assert ids(page) == [4, 0, 6, 3] and page.total == 4
    assert [row["activation"] for row in page.rows] == [2.5, 2.0, 1.5, 0.25]
    assert [row["activation_rank"] for row in page.rows] == [0, 1, 2, 3]
    # filters apply within the ranked texts
    assert ids(store.corpus(path, sort="feature", layer=LAYER, feature=CONTEXT_FEATURE, contains="plot")) == [4, 6, 3]
    assert store.corpus(path, sort="feature", layer=LAYER, feature=CONTEXT_FEATURE, split="train").total == 1
    assert store.corpus(path, sort="feature", layer=LAYER, feature=CONTEXT_FEATURE + 1).total == 0
    # another sort with a feature named: every text, the activation where it is ranked
    by_id = store.corpus(path, sort="text_id", layer=LAYER, feature=CONTEXT_FEATURE)
    assert by_id.total == len(TEXTS)
    assert [row["activation"] for row in by_id.rows] == [2.0, None, None, 0.25, 2.5, None, 1.5]
    assert store.ranked_text_count(path, LAYER, CONTEXT_FEATURE) == 4


def test_feature_sort_needs_a_known_layer_and_feature_in_range(path):
    with pytest.raises(ValueError, match="needs a layer and a feature"):
        store.corpus(path, sort="feature")
    with pytest.raises(ValueError, match="layer and feature go together"):
        store.corpus(path, sort="feature", layer=LAYER)
    with pytest.raises(ValueError, match="layer and feature go together"):
        store.corpus(path, feature=3)
    with pytest.raises(store.NotFound, match="layer 4 not found: this run has SAEs at layers 3, 5"):
        store.corpus(path, sort="feature", layer=4, feature=0)
    with pytest.raises(ValueError, match="feature 64 is out of range: layer 3's SAE has 64 features"):
        store.corpus(path, sort="feature", layer=LAYER, feature=64)


def test_pages_slice_the_order_and_keep_the_total(path):
    everything = ids(store.corpus(path, sort="-score"))
    pages = [store.corpus(path, sort="-score", offset=offset, limit=3) for offset in (0, 3, 6, 9)]
    assert [ids(p) for p in pages] == [everything[:3], everything[3:6], everything[6:], []]
    assert {p.total for p in pages} == {len(TEXTS)}  # beyond the end: no rows, the total still known


def test_the_synthetic_fixture_ranks_each_live_feature_s_texts():
    tables = synthetic_tables()["feature_texts"]
    mine = [(r, t, a) for layer, f, r, t, a in zip(*(tables[c] for c in ("layer", "feature", "rank", "text_id",
                                                                          "activation")))
            if layer == LAYER and f == CONTEXT_FEATURE]
    assert len(mine) == RANKED_TEXTS and [a for *_, a in mine] == sorted((a for *_, a in mine), reverse=True)
    assert not any(f == DEAD_FEATURE for f in tables["feature"])


# -- the running top N ---------------------------------------------------------------------

def random_batches(n_batches: int, d_sae: int = 7, seed: int = 0):
    """Sparse activations of texts of random lengths, the first token of each text special."""
    rng = np.random.default_rng(seed)
    out, next_id = [], 0
    for _ in range(n_batches):
        lengths = rng.integers(2, 9, rng.integers(1, 6))
        n = int(lengths.sum())
        acts = rng.exponential(1.0, (n, d_sae)) * (rng.random((n, d_sae)) < 0.25)
        acts[:, -1] = 0.0  # a feature that never fires
        content = np.ones(n, bool)
        content[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = False
        acts[~content, 0] = 50.0  # feature 0 peaks at special tokens only: they must not count
        token_text_ids = np.repeat(np.arange(next_id, next_id + len(lengths)), lengths)
        next_id += len(lengths)
        out.append((acts.astype(np.float32), token_text_ids, content))
    return out


def firings(acts: np.ndarray):
    """(token, feature, activation) where the feature fires, as FeatureAccumulator finds them."""
    codes = torch.from_numpy(acts)
    token, feature = codes.nonzero(as_tuple=True)
    return token, feature, codes[token, feature]


def brute_force_maxima(batches, d_sae: int = 7) -> dict[int, np.ndarray]:
    maxima = {}
    for acts, token_text_ids, content in batches:
        for text_id in np.unique(token_text_ids):
            mine = (token_text_ids == text_id) & content
            maxima[int(text_id)] = acts[mine].max(axis=0) if mine.any() else np.zeros(d_sae, np.float32)
    return maxima


def rank(batches, n: int) -> dict[str, list]:
    ranked = RankedTexts(7, n)
    for acts, token_text_ids, content in batches:
        ranked.add(*firings(acts), torch.from_numpy(token_text_ids), torch.from_numpy(content))
    return ranked.columns(layer=2)


@pytest.mark.parametrize("n", [1, 5, 300, 1000])  # 300: some merges before the last, 1000: all at the end
def test_running_top_n_is_each_feature_s_strongest_texts(n):
    batches = random_batches(200)
    columns = rank(batches, n)
    assert set(columns["layer"]) == {2}
    maxima = brute_force_maxima(batches)
    assert len(maxima) > 300
    for f in range(7):
        expected = sorted(((m[f], t) for t, m in maxima.items() if m[f] > 0), reverse=True)[:n]
        mine = [i for i, feature in enumerate(columns["feature"]) if feature == f]
        assert [columns["rank"][i] for i in mine] == list(range(len(expected)))
        assert [columns["text_id"][i] for i in mine] == [t for _, t in expected]
        np.testing.assert_allclose([columns["activation"][i] for i in mine], [a for a, _ in expected])
    assert 6 not in columns["feature"]  # silent everywhere: no rows
    assert max(columns["activation"]) < 50  # special tokens never count


def test_running_top_n_off_and_per_text_maxima():
    acts, token_text_ids, content = random_batches(1, seed=3)[0]
    assert rank([(acts, token_text_ids, content)], 0) == {
        "layer": [], "feature": [], "rank": [], "text_id": [], "activation": []}
    maxima, text_ids = per_text_maxima(*firings(acts), torch.from_numpy(token_text_ids + 40), 7)
    assert text_ids.tolist() == sorted(set((token_text_ids + 40).tolist()))
    expected = brute_force_maxima([(acts, token_text_ids, np.ones(len(acts), bool))])
    np.testing.assert_allclose(maxima.numpy(), np.stack([expected[int(t) - 40] for t in text_ids]))


def test_the_analysis_accumulator_ranks_texts_without_their_special_tokens():
    from backend.core.run_config import AnalysisConfig
    from workers.feature_stream import FeatureAccumulator, TokenBatch

    batches = random_batches(20, seed=5)
    acc = FeatureAccumulator(7, 10, AnalysisConfig(ranked_texts=4))
    for acts, token_text_ids, content in batches:
        n = len(acts)
        acc.add_tokens(torch.from_numpy(acts), TokenBatch(
            token_ids=torch.zeros(n, dtype=torch.int64), text_ids=torch.from_numpy(token_text_ids),
            positions=torch.zeros(n, dtype=torch.int64), text_lengths=torch.ones(n, dtype=torch.int64),
            content=torch.from_numpy(content)))
    assert acc.ranked.columns(2) == rank(batches, 4)
    maxima = brute_force_maxima(batches)
    top = max(maxima, key=lambda t: maxima[t][0])
    assert acc.ranked.columns(0)["text_id"][0] == top and float(acc.max[0]) == 50.0  # the peak, at a special token


@pytest.mark.parametrize("value, message", [
    (-1, "analysis.ranked_texts: Input should be greater than or equal to 0"),
    (2.5, "analysis.ranked_texts: Input should be a valid integer"),
    (True, "analysis.ranked_texts: Input should be a valid integer"),
    ("100", "analysis.ranked_texts: Input should be a valid integer"),
    (10**6, "analysis.ranked_texts: Input should be less than or equal to 10000"),
])
def test_ranked_texts_must_be_a_whole_number_from_0(value, message):
    from backend.core.run_config import ConfigError, parse_config

    base = {"name": "x", "model": {"path": "demo"}, "dataset": {"source": "demo"}, "layers": [1]}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "analysis": {"ranked_texts": value}})
    assert message in str(err.value)
    assert parse_config(base).analysis.ranked_texts == 1000
    assert parse_config({**base, "analysis": {"ranked_texts": 0}}).analysis.ranked_texts == 0
