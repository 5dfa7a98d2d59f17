"""The streamed per-feature analysis against brute force on hand-made sparse activations, and
the reward effect against a finite difference on a tiny model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.core.run_config import AnalysisConfig
from workers.feature_stream import FeatureAccumulator, TokenBatch

D_SAE, VOCAB_SIZE, TEXT_LEN = 6, 40, 12


def make_batches(n_batches: int, texts_per_batch: int = 8, seed: int = 0):
    """Sparse activations whose scale grows batch by batch (so ranges must widen), tokens
    drawn from a small vocabulary, contiguous texts of TEXT_LEN tokens."""
    rng = np.random.default_rng(seed)
    out, text_id = [], 0
    for b in range(n_batches):
        n = texts_per_batch * TEXT_LEN
        acts = rng.exponential(1.0 + b, size=(n, D_SAE)) * (rng.random((n, D_SAE)) < 0.3)
        acts[:, D_SAE - 1] = 0.0  # a dead feature
        tokens = TokenBatch(
            token_ids=torch.from_numpy(rng.integers(0, VOCAB_SIZE, n)),
            text_ids=torch.arange(text_id, text_id + texts_per_batch).repeat_interleave(TEXT_LEN),
            positions=torch.arange(TEXT_LEN).repeat(texts_per_batch),
            text_lengths=torch.full((n,), TEXT_LEN),
        )
        out.append((torch.from_numpy(acts).float(), tokens))
        text_id += texts_per_batch
    return out


def accumulate(batches, **config) -> FeatureAccumulator:
    acc = FeatureAccumulator(D_SAE, VOCAB_SIZE, AnalysisConfig(**config), seed=1)
    for acts, tokens in batches:
        acc.add_tokens(acts, tokens)
    return acc


def flat(batches):
    acts = torch.cat([a for a, _ in batches]).numpy()
    tokens = torch.cat([t.token_ids for _, t in batches]).numpy()
    return acts, tokens


def window_of(acts, tokens, text_id, position, feature, before, after):
    start = text_id * TEXT_LEN
    lo, hi = max(0, position - before), min(TEXT_LEN, position + after + 1)
    return tokens[start + lo : start + hi], acts[start + lo : start + hi, feature], lo


def test_counts_means_and_histograms_match_brute_force():
    batches = make_batches(6)
    acc = accumulate(batches, histogram_bins=8)
    acts, _ = flat(batches)
    for f in range(D_SAE):
        vals = acts[:, f][acts[:, f] > 0]
        assert int(acc.count[f]) == len(vals)
        edges, counts = acc.histograms()[f]
        if len(vals) == 0:
            assert edges == [] and counts == []
            continue
        assert float(acc.max[f]) == pytest.approx(vals.max())
        assert float(acc.sum[f]) / len(vals) == pytest.approx(vals.mean(), rel=1e-6)
        # the range doubled as larger values came, but every count is exact for its bin
        assert edges[-2] <= vals.max() < edges[-1] and float(acc.hi[f]) <= 2 * vals.max() * (1 + 1e-6)
        expected, _ = np.histogram(vals, bins=edges)
        assert counts == expected.tolist() and sum(counts) == len(vals)
        assert edges == pytest.approx([i * float(acc.hi[f]) / 8 for i in range(len(counts) + 1)])


def test_top_contexts_are_the_strongest_activations_with_their_windows():
    batches = make_batches(6)
    config = dict(n_contexts=4, window_before=3, window_after=2)
    acc = accumulate(batches, **config)
    acts, tokens = flat(batches)
    c = acc.contexts("top")
    for f in range(D_SAE - 1):
        expected = np.sort(acts[:, f])[::-1][:4]
        mine = c["feature"] == f
        assert c["rank"][mine].tolist() == [0, 1, 2, 3]
        np.testing.assert_allclose(c["activation"][mine], expected, rtol=1e-6)
        for i in np.flatnonzero(mine):
            win_tokens, win_acts, start = window_of(acts, tokens, c["text_id"][i], c["position"][i], f, 3, 2)
            inside = c["tokens"][i] >= 0
            assert c["tokens"][i][inside].tolist() == win_tokens.tolist()
            np.testing.assert_allclose(c["acts"][i][inside], win_acts, rtol=1e-6)
            assert c["position"][i] - 3 + inside.argmax() == start
    assert not (c["feature"] == D_SAE - 1).any()  # the dead feature has no contexts


def test_quantile_bins_hold_examples_from_their_own_bin():
    batches = make_batches(8)
    acc = accumulate(batches, quantile_bins=5, quantile_examples=3)
    acts, _ = flat(batches)
    q = acc.contexts("quantile")
    for f in range(D_SAE - 1):
        mine = q["feature"] == f
        vals = acts[:, f][acts[:, f] > 0]
        # bins are equal slices of [0, range); at least 5 of them lie below the max
        width = q["bin_high"][mine][0] - q["bin_low"][mine][0]
        assert vals.max() / width > 5
        for b in np.unique(q["bin"][mine]):
            in_bin = mine & (q["bin"] == b)
            lo, hi = q["bin_low"][in_bin][0], q["bin_high"][in_bin][0]
            population = vals[(vals >= lo) & (vals < hi)]
            # every sample is a real activation of this bin; a bin keeps min(3, its size)
            assert ((q["activation"][in_bin] >= lo) & (q["activation"][in_bin] < hi)).all()
            assert np.isin(q["activation"][in_bin], population).all()
            assert in_bin.sum() == min(3, len(population))
        bins_with_values = {int(v // width) for v in vals}
        assert set(q["bin"][mine].tolist()) == bins_with_values
        assert len(bins_with_values) >= 5


def test_quantile_samples_are_uniform_within_a_bin():
    """Bottom-k sampling with random keys: every firing in a bin is equally likely kept."""
    n, runs, hits = 60, 120, np.zeros(60)
    acts = torch.zeros(n, D_SAE)
    acts[:, 0] = 1.0  # one bin holding n identical activations, fed in 3 batches
    for seed in range(runs):
        acc = FeatureAccumulator(D_SAE, VOCAB_SIZE, AnalysisConfig(quantile_examples=5), seed=seed)
        for part in range(3):
            rows = slice(20 * part, 20 * part + 20)
            acc.add_tokens(acts[rows], TokenBatch(torch.zeros(20, dtype=torch.int64), torch.arange(20 * part, 20 * part + 20),
                                                  torch.zeros(20, dtype=torch.int64), torch.ones(20, dtype=torch.int64)))
        hits[acc.contexts("quantile")["text_id"]] += 1
    # each of the 60 firings is kept with probability 5/60: 120 runs give ~10 hits each
    assert hits.sum() == runs * 5
    assert hits[:20].sum() == pytest.approx(hits[40:].sum(), rel=0.25)  # early and late batches alike
    assert hits.min() >= 1 and hits.max() < 25


def test_top_tokens_by_mean_activation_match_brute_force():
    batches = make_batches(5)
    acc = accumulate(batches, top_tokens=3, top_token_min_count=2)
    acts, tokens = flat(batches)
    occurrences = np.bincount(tokens, minlength=VOCAB_SIZE)
    for f, row in enumerate(acc.top_tokens()):
        means = np.bincount(tokens, weights=acts[:, f], minlength=VOCAB_SIZE) / np.maximum(occurrences, 1)
        means[occurrences < 2] = -1
        means[np.bincount(tokens, weights=acts[:, f] > 0, minlength=VOCAB_SIZE) == 0] = -1
        expected = [t for t in np.argsort(-means, kind="stable")[:3] if means[t] > 0]
        assert [t for t, _, _ in row] == expected
        for t, mean, fired in row:
            assert mean == pytest.approx(means[t]) and fired == int(((tokens == t) & (acts[:, f] > 0)).sum())


def test_correlation_with_reward_matches_numpy():
    rng = np.random.default_rng(3)
    acc = FeatureAccumulator(D_SAE, VOCAB_SIZE, AnalysisConfig())
    pooled = rng.exponential(size=(300, D_SAE)) * (rng.random((300, D_SAE)) < 0.5)
    pooled[:, 1] = pooled[:, 0] * 2 + 1  # perfectly correlated with feature 0
    pooled[:, D_SAE - 1] = 0  # constant: no correlation defined
    scores = pooled[:, 0] * 0.5 + rng.normal(size=300)
    for rows in np.array_split(np.arange(300), 7):
        acc.add_reads(torch.from_numpy(pooled[rows]).float(), torch.from_numpy(scores[rows]))
    r = acc.correlation()
    for f in range(D_SAE - 1):
        assert r[f] == pytest.approx(np.corrcoef(pooled[:, f].astype(np.float32), scores)[0, 1], abs=1e-6)
    assert r[0] == pytest.approx(r[1], abs=1e-6) and r[0] > 0.3
    assert np.isnan(r[D_SAE - 1])


def test_memory_does_not_grow_with_the_corpus():
    def state_bytes(acc):
        tensors = [acc.hist, acc.count, acc.sum, acc.max, acc.hi, acc.top.key, acc.samples.key,
                   *acc.top.payload.values(), *acc.samples.payload.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    small, large = accumulate(make_batches(2)), accumulate(make_batches(40, seed=1))
    assert state_bytes(small) == state_bytes(large)
    large._compact_pairs()
    assert 0 < len(large.pair_keys) <= D_SAE * VOCAB_SIZE  # bounded by (feature, token) pairs, not tokens


# -- the reward effect on a tiny model -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from sae_lens import TopKSAE, TopKSAEConfig

    from tests.tiny_models import save_tiny_bert
    from workers.adapters import load_adapter

    path = save_tiny_bert(tmp_path_factory.mktemp("rm") / "bert", n_layers=3, hidden=32)
    adapter = load_adapter("seq_cls", str(path), torch.device("cpu"), max_length=24)
    torch.manual_seed(0)
    saes = {}
    for layer in (0, 1):
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=16, k=4, device="cpu", rescale_acts_by_decoder_norm=True))
        with torch.no_grad():  # a random SAE whose decoder rows have different norms
            sae.W_enc.normal_(0, 0.5)
            sae.W_dec.normal_(0, 0.3)
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, 16).unsqueeze(1))
        saes[layer] = sae.eval()
    return adapter, saes


TEXTS = ["a great film with a dull ending", "not bad at all", "the plot was awful but the cast shines",
         "boring", "i loved every minute of it, truly", "worst acting i have seen"]


def test_decoder_directions_are_the_reconstructions_change_per_unit(tiny_rm):
    from workers.sae_ops import decoder_directions

    _, saes = tiny_rm
    sae = saes[0]
    directions = decoder_directions(sae, chunk=5)
    base = torch.rand(3, 16)
    for f in (0, 7, 15):
        bumped = base.clone()
        bumped[:, f] += 1.0
        torch.testing.assert_close(sae.decode(bumped) - sae.decode(base), directions[f].expand(3, -1), atol=1e-5, rtol=1e-4)


def test_reward_effect_matches_a_finite_difference(tiny_rm):
    from workers.analyze import collect_corpus_activations

    adapter, saes = tiny_rm
    acts = collect_corpus_activations(adapter, saes, TEXTS, np.zeros(len(TEXTS), bool), batch_size=4,
                                      pooling="mean", analysis=AnalysisConfig(reward_effect_texts=100))
    assert acts.n_effect_texts == len(TEXTS)
    eps, checked = 1e-2, 0
    batch = adapter.tokenize(TEXTS)  # texts do not see each other: the summed score moves by the sum
    # the text's own tokens: special tokens ([CLS], [SEP]) are left out, as token pooling does
    special = torch.isin(batch.input_ids, torch.tensor(adapter.tokenizer.all_special_ids))
    real = batch.attention_mask.bool() & ~special
    for layer, sae in saes.items():
        effect = acts.layers[layer].features.reward_effect()
        _, captured = adapter.run(batch, capture=[layer], need_score=False)
        codes = sae.encode(captured[layer])
        for f in range(16):
            # raise feature f by eps at every text token where it fires, through the SAE's decoder:
            # the summed score's change per unit, over the number of firings
            fires = (codes[..., f] > 0) & real
            if not fires.any():
                assert np.isnan(effect[f])
                continue

            def bumped_total(sign):
                def edit(hidden):
                    a = sae.encode(hidden)
                    step = torch.zeros_like(a)
                    step[..., f] = sign * eps * fires
                    return hidden + sae.decode(a + step) - sae.decode(a)
                return adapter.run(batch, edits={layer: edit})[0].sum().item()

            finite_difference = (bumped_total(1) - bumped_total(-1)) / (2 * eps) / int(fires.sum())
            assert effect[f] == pytest.approx(finite_difference, rel=2e-2, abs=1e-4)
            checked += 1
    assert checked >= 8


def test_reward_effect_budget_and_off_switch(tiny_rm):
    from workers.analyze import collect_corpus_activations, effect_batches

    adapter, saes = tiny_rm
    off = collect_corpus_activations(adapter, saes, TEXTS, np.zeros(len(TEXTS), bool), batch_size=2,
                                     pooling="sum", analysis=AnalysisConfig(reward_effect_texts=0))
    assert off.n_effect_texts == 0 and np.isnan(off.layers[0].features.reward_effect()).all()
    batches = [np.arange(i, i + 10) for i in range(0, 1000, 10)]
    chosen = effect_batches(batches, 95, seed=0)
    assert len(chosen) == 10 and chosen != set(range(10))  # random batches, about the budget


def test_feature_tables_columns_line_up(tiny_rm):
    from workers.analyze import collect_corpus_activations, feature_tables

    adapter, saes = tiny_rm
    acts = collect_corpus_activations(adapter, saes, TEXTS, np.zeros(len(TEXTS), bool), batch_size=4,
                                      pooling="mean", analysis=AnalysisConfig(n_contexts=3, reward_effect_texts=0))
    vocab = np.array(adapter.tokenizer.convert_ids_to_tokens(list(range(len(adapter.tokenizer)))), dtype=object)
    feats, ctx = feature_tables(1, acts.layers[1], vocab)
    assert all(len(v) == 16 for v in feats.values())
    assert len({len(v) for v in ctx.values()}) == 1
    for i in range(len(ctx["feature"])):
        tokens, acts_row = ctx["tokens"][i], ctx["acts"][i]
        text_tokens = adapter.tokenizer.convert_ids_to_tokens(adapter.tokenizer(TEXTS[ctx["text_id"][i]])["input_ids"])
        start = ctx["window_start"][i]
        assert text_tokens[start : start + len(tokens)] == tokens and len(acts_row) == len(tokens)
        assert acts_row[ctx["position"][i] - start] == pytest.approx(ctx["activation"][i])
        if ctx["kind"][i] == "top" and ctx["rank"][i] == 0:
            assert feats["top_token"][ctx["feature"][i]] == tokens[ctx["position"][i] - start]
    fired = np.array(feats["frequency"]) > 0
    assert [f is None for f in feats["top_token"]] == (~fired).tolist()
