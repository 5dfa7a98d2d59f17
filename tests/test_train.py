"""Every SAE architecture trains through SAELens, saves in SAELens format and reloads; the lr
schedule and dead-feature knobs reach SAELens; reward recovered matches a hand computation."""
from __future__ import annotations

import pytest
import torch

from tests.tiny_models import save_tiny_bert
from workers.adapters import load_adapter
from backend.core.run_config import ConfigError, SaeConfig, parse_config
from workers.evaluate import reward_recovery, zero_output
from workers.train import build_training_sae, load_saes, train_saes, trainer_config
from backend.web.routes.formats import fmt_num

WIDTH, K, HIDDEN = 64, 4, 32
# the inference class each architecture reloads as (BatchTopK folds into a JumpReLU SAE)
RELOADS_AS = {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE",
              "standard": "StandardSAE", "l1_sqrt": "StandardSAE"}


# knobs that suit a 32-wide model trained for 200 steps (the defaults suit d_model in the hundreds)
TINY_KNOBS = {"topk": {"k": K}, "batchtopk": {"k": K}, "standard": {"l1_coefficient": 1.0},
              "l1_sqrt": {"l1_coefficient": 0.05}, "jumprelu": {"lr": 0.01}}


def config_for(architecture: str, **sae):
    knobs = TINY_KNOBS.get(architecture, {})
    return parse_config({
        "name": f"tiny {architecture}",
        "model": {"path": "tiny", "max_length": 32},
        "dataset": {"source": "demo", "batch_size": 32},
        "layers": [0, 1],
        "sae": {"architecture": architecture, "width": WIDTH, "training_tokens": 200 * 64, "batch_size": 64,
                "buffer_tokens": 512, "lr": 3e-3, **knobs, **sae},
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from workers.demo_corpus import generate_corpus

    path = save_tiny_bert(tmp_path_factory.mktemp("rm") / "tiny-bert", n_layers=2, hidden=HIDDEN)
    adapter = load_adapter("seq_cls", str(path), torch.device("cpu"), max_length=32)
    texts = generate_corpus(160, seed=3)
    return adapter, texts[:120], texts[120:]


def heldout_activations(adapter, texts, layer):
    batch = adapter.tokenize(texts)
    _, captured = adapter.run(batch, capture=[layer], need_score=False)
    return captured[layer][batch.attention_mask.bool()].float()


@pytest.mark.parametrize("architecture", list(RELOADS_AS))
def test_architecture_trains_saves_and_reloads(world, tmp_path, architecture):
    adapter, train_texts, heldout = world
    config = config_for(architecture)
    paths = train_saes(config, adapter, train_texts, tmp_path)
    saes = load_saes(paths, adapter.device)
    for layer, sae in saes.items():
        assert (paths[layer] / "cfg.json").is_file() and (paths[layer] / "sae_weights.safetensors").is_file()
        assert type(sae).__name__ == RELOADS_AS[architecture]
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        x = heldout_activations(adapter, heldout, layer)
        with torch.no_grad():
            acts = sae.encode(x)
            recon = sae.decode(acts)
        assert acts.shape == (len(x), WIDTH) and (acts >= 0).all()
        l0 = (acts > 0).sum(-1).float()
        explained = 1 - ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert explained > 0.5, f"{architecture} layer {layer}: explained variance {explained:.3f}"
        assert 0 < l0.mean() < WIDTH / 2, f"{architecture} layer {layer}: L0 {l0.mean():.1f}"
        if architecture == "topk":
            assert l0.max() <= K
        if architecture == "batchtopk":  # k active per token on average, not per token
            assert l0.mean() < 3 * K and sae.threshold.min() == sae.threshold.max() > 0


def test_l1_sqrt_is_the_p_half_penalty():
    sqrt_sae = build_training_sae(config_for("l1_sqrt", l1_coefficient=2.0).sae, HIDDEN, "cpu")
    l1_sae = build_training_sae(config_for("standard").sae, HIDDEN, "cpu")
    assert (sqrt_sae.cfg.lp_norm, sqrt_sae.cfg.l1_coefficient) == (0.5, 2.0)
    assert (l1_sae.cfg.lp_norm, l1_sae.cfg.l1_coefficient) == (1.0, 1.0)
    # unset, the p=0.5 penalty gets a weight that suits its much larger values
    assert build_training_sae(SaeConfig(architecture="l1_sqrt"), HIDDEN, "cpu").cfg.l1_coefficient < 1.0


def test_knobs_belong_to_their_architecture():
    with pytest.raises(ConfigError, match=r"sae\.k applies to batchtopk, topk, not to sae.architecture 'jumprelu'"):
        config_for("jumprelu", k=8)
    with pytest.raises(ConfigError, match=r"sae\.l1_coefficient applies to l1_sqrt, standard"):
        config_for("topk", l1_coefficient=1.0)
    with pytest.raises(ConfigError, match=r"sae\.lr_warm_up_fraction \+ sae\.lr_decay_fraction"):
        config_for("topk", lr_warm_up_fraction=0.5, lr_decay_fraction=0.5)
    with pytest.raises(ConfigError, match=r"sae\.architecture"):
        config_for("gated")


def test_aux_loss_off_is_never_computed_and_rescale_reaches_sae_lens():
    sae = config_for("topk", aux_loss_coefficient=0.0, rescale_acts_by_decoder_norm=True).sae
    cfg = trainer_config(sae, torch.device("cpu"))
    assert cfg.dead_feature_window > cfg.total_training_steps  # no feature ever counts as dead
    training_sae = build_training_sae(sae, HIDDEN, "cpu")
    assert training_sae.cfg.rescale_acts_by_decoder_norm is True
    assert training_sae.cfg.aux_loss_coefficient == 0.0
    assert build_training_sae(config_for("topk").sae, HIDDEN, "cpu").cfg.rescale_acts_by_decoder_norm is False  # default
    assert trainer_config(config_for("topk").sae, torch.device("cpu")).dead_feature_window == 50


def test_lr_schedule_and_dead_window_reach_sae_lens():
    from sae_lens.training.optim import get_lr_scheduler

    sae = config_for("topk", lr=1e-3, lr_warm_up_fraction=0.1, lr_decay_fraction=0.2, dead_feature_window=7).sae
    cfg = trainer_config(sae, torch.device("cpu"))
    assert (cfg.lr_warm_up_steps, cfg.lr_decay_steps, cfg.dead_feature_window) == (20, 40, 7)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = get_lr_scheduler(cfg.lr_scheduler_name, optimizer, cfg.total_training_steps, cfg.lr,
                                 cfg.lr_warm_up_steps, cfg.lr_decay_steps, cfg.lr_end, cfg.n_restart_cycles)
    lrs = []
    for _ in range(cfg.total_training_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < 1e-4 and max(lrs) == pytest.approx(1e-3)  # warms up to the full lr
    assert lrs[100] == pytest.approx(1e-3) and lrs[-1] < 1e-4  # holds it, then decays


def hand_scores(adapter, texts, layer=None, edit=None):
    """The RM's score text by text (no padding), editing block `layer`'s output by hand."""
    handle = None
    if edit is not None:
        handle = adapter.model.bert.encoder.layer[layer].register_forward_hook(
            lambda module, args, out: (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out))
    try:
        with torch.no_grad():
            return torch.stack([
                adapter.model(**adapter.tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts])
    finally:
        if handle is not None:
            handle.remove()


def test_reward_recovered_matches_a_hand_computation(world):
    adapter, _, heldout = world
    texts = heldout[:24]
    offset = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    shift = lambda h: h + offset  # noqa: E731 - an imperfect "reconstruction"
    got = reward_recovery(adapter, {0: shift, 1: lambda h: h}, texts, batch_size=8)
    clean = hand_scores(adapter, texts)
    mae_edit = (hand_scores(adapter, texts, 0, shift) - clean).abs().mean().item()
    mae_zero = (hand_scores(adapter, texts, 0, torch.zeros_like) - clean).abs().mean().item()
    assert mae_zero > 0
    assert got[0].mae_sae == pytest.approx(mae_edit, rel=1e-3)
    assert got[0].mae_zero == pytest.approx(mae_zero, rel=1e-3)
    assert got[0].reward_recovered == pytest.approx(1 - mae_edit / mae_zero, rel=1e-3)
    assert got[0].n_reads == got[0].n_texts == len(texts)
    # a perfect reconstruction recovers all of the reward; zeroing recovers none of it
    assert got[1].mae_sae == 0.0 and got[1].reward_recovered == 1.0
    assert reward_recovery(adapter, {1: zero_output}, texts, batch_size=8)[1].reward_recovered == 0.0


def test_run_page_shows_reward_recovered_per_layer(client, synthetic_run):
    layers = synthetic_run["layers"]
    api = client.get("/api/runs/synthetic").json()
    rows = api["layers"] if "layers" in api else api["run"]["layers"]
    assert [row["reward_recovered"] for row in rows] == pytest.approx(layers["reward_recovered"])
    html = client.get("/runs/synthetic").text
    cells = html.split('id="layers"')[1]
    for value in layers["reward_recovered"]:
        assert 'class="num reward-recovered"' in cells and f">{fmt_num(value)}</td>" in cells


def test_the_decoder_bias_starts_at_the_mean_of_what_it_is_trained_on():
    """CentredStartTrainer: b_dec starts at the norm-estimate batches' mean (scaled as the SAE
    sees them); with centred=False, at SAELens's zero."""
    import torch
    from sae_lens.saes.sae import SAEMetadata

    from backend.core.run_config import SaeConfig
    from workers.train import CentredStartTrainer, build_training_sae, trainer_config

    rng = torch.Generator().manual_seed(0)
    data = 5.0 + torch.randn(4096, 16, generator=rng)  # far from zero, as a residual stream is

    def batches():
        while True:
            for start in range(0, len(data), 64):
                yield {"h": data[start:start + 64]}

    starts = {}
    for centred in (True, False):
        config = SaeConfig(architecture="topk", width=32, k=4, training_tokens=1000, batch_size=64)
        sae = build_training_sae(config, 16, "cpu", SAEMetadata(hook_name="h"))
        trainer = CentredStartTrainer(cfg=trainer_config(config, torch.device("cpu")), saes={"s": sae},
                                      hook_names={"s": "h"}, data_provider=batches(), centred=centred)
        trainer._estimate_scaling_factors()
        starts[centred] = (sae.b_dec.detach().clone(), trainer.trainers["s"].activation_scaler.scaling_factor)
    b_dec, scale = starts[True]
    seen = data[: 64 * trainer_config(config, torch.device("cpu")).n_batches_for_norm_estimate]
    assert torch.allclose(b_dec, seen.mean(0) * scale, atol=1e-4)
    assert torch.count_nonzero(starts[False][0]) == 0
