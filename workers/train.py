"""Train one SAE per layer with SAELens's MultiSAETrainer, from one shared activation stream.

Every architecture is a SAELens training class; `build_training_sae` maps the run config's
architecture and knobs onto it. Saved SAEs are SAELens inference SAEs (BatchTopK folds into a
JumpReLU SAE with one threshold, L1 and L1-sqrt into a standard SAE), so SAE.load_from_disk
reopens every one of them.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from sae_lens import (
    SAE,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    TrainingSAE,
)
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from workers import distributed
from workers.adapters import RewardModelAdapter
from workers.collect import activation_stream, shuffled_batches
from backend.core.run_config import RunConfig, SaeConfig
from workers.distributed_train import (SAE_SEED_STRIDE, drain, layer_owners, own_hooks_only, seeded,
                                       share_sae_files, sharded_activation_stream)
from workers.sinks import SinkRule, measure_sink_rules, with_sink_rule

NORM_ESTIMATE_BATCHES = 20
# The "sqrt" penalty: SAELens's standard SAE with an L_p sparsity norm, p = 0.5.
SQRT_PENALTY_P = 0.5
# Default penalty weights on normalised inputs: the p=0.5 penalty, (sum of sqrt(a))^2, is about L0
# times the L1 penalty on the same activations, hence a much smaller weight.
DEFAULT_L1_COEFFICIENT = {"standard": 5.0, "l1_sqrt": 0.15}


def sae_dir(run_dir: Path, layer: int) -> Path:
    return run_dir / "saes" / f"layer_{layer}"


def pair_dir(run_dir: Path, layer: int, width: int) -> Path:
    """Where the paired dictionary of `width` (sae.widths' smaller size) is saved for `layer`."""
    return run_dir / "saes" / "pair" / f"layer_{layer}_w{width}"


def pair_key(layer: int, width: int) -> str:
    return f"layer_{layer}_w{width}"


def build_training_sae(sae: SaeConfig, d_in: int, device: str, metadata: SAEMetadata | None = None) -> TrainingSAE:
    """The SAELens training SAE for `sae.architecture`, with that architecture's knobs."""
    common = dict(
        d_in=d_in,
        d_sae=sae.width,
        device=device,
        # scale inputs to unit expected norm while training; SAELens folds it back afterwards
        normalize_activations="expected_average_only_in",
        metadata=metadata or SAEMetadata(),
    )
    penalty_warm_up = round(sae.sparsity_warm_up_fraction * sae.n_steps)
    if sae.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(
            k=sae.k, aux_loss_coefficient=sae.aux_loss_coefficient,
            rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, **common))
    if sae.architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
            k=sae.k, aux_loss_coefficient=sae.aux_loss_coefficient, topk_threshold_lr=sae.topk_threshold_lr, **common))
    if sae.architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
            jumprelu_init_threshold=sae.jumprelu_init_threshold, jumprelu_bandwidth=sae.jumprelu_bandwidth,
            l0_coefficient=sae.l0_coefficient, l0_warm_up_steps=penalty_warm_up,
            pre_act_loss_coefficient=sae.pre_act_loss_coefficient, **common))
    if sae.architecture in ("standard", "l1_sqrt"):
        return StandardTrainingSAE(StandardTrainingSAEConfig(
            l1_coefficient=sae.l1_coefficient or DEFAULT_L1_COEFFICIENT[sae.architecture],
            l1_warm_up_steps=penalty_warm_up,
            lp_norm=SQRT_PENALTY_P if sae.architecture == "l1_sqrt" else 1.0, **common))
    raise ValueError(f"sae.architecture: unknown architecture {sae.architecture!r}")


def trainer_config(sae: SaeConfig, device: torch.device) -> SAETrainerConfig:
    """SAELens trainer settings: lr schedule and dead-feature window from the run config."""
    n_steps = sae.n_steps
    dead_window = sae.dead_feature_window or max(1, min(1000, n_steps // 4))
    if sae.architecture in ("topk", "batchtopk") and sae.aux_loss_coefficient == 0:
        # SAELens computes the dead-feature loss whenever a feature counts as dead, even at weight 0:
        # a window longer than training means none ever does, which saves an extra decode per step
        dead_window = n_steps + 1
    return SAETrainerConfig(
        total_training_samples=sae.training_tokens,
        train_batch_size_samples=sae.batch_size,
        lr=sae.lr,
        lr_scheduler_name=sae.lr_scheduler,
        lr_end=sae.lr_end or sae.lr / 10,
        # SAELens's linear warm-up needs at least two steps
        lr_warm_up_steps=warm if (warm := round(sae.lr_warm_up_fraction * n_steps)) >= 2 else 0,
        lr_decay_steps=round(sae.lr_decay_fraction * n_steps),
        device=str(device),
        autocast=device.type == "cuda",
        n_batches_for_norm_estimate=NORM_ESTIMATE_BATCHES,
        dead_feature_window=dead_window,
        feature_sampling_window=max(1, min(2000, n_steps // 2)),
    )


class _FirstBatches:
    """An iterator that keeps its first `n` items as it yields them."""

    def __init__(self, items: Iterator, n: int):
        self.items, self.n, self.kept = items, n, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        if len(self.kept) < self.n:
            self.kept.append(item)
        return item


class CentredStartTrainer(MultiSAETrainer):
    """MultiSAETrainer whose SAEs start with b_dec at the mean of the norm-estimate batches, scaled
    as the SAE sees them. SAELens 6 starts b_dec at zero; a residual stream's mean is far from zero,
    so every token's pre-activations share one large component, the same few latents win the top-k
    for every token and most never fire (on SmolLM2, 60% dead after 234 steps). Starting at the mean,
    as the TopK SAE papers do (b_pre at the data's median), each latent reads what varies."""

    def __init__(self, *args, centred: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.centred = centred

    def _estimate_scaling_factors(self) -> None:
        if not self.centred:  # sae.decoder_bias_init: zero, SAELens's own start
            return super()._estimate_scaling_factors()
        first = self.data_provider = _FirstBatches(self.data_provider, self.cfg.n_batches_for_norm_estimate)
        super()._estimate_scaling_factors()
        self.data_provider = first.items
        with torch.no_grad():
            for name, sae in self.saes.items():
                rows = torch.cat([batch[self.hook_names[name]] for batch in first.kept]).to(sae.b_dec.device)
                scale = self.trainers[name].activation_scaler.scaling_factor or 1.0
                sae.b_dec.data.copy_(rows.float().mean(0) * scale)


class _Reporting:
    """Wraps the trainer's data provider: every batch it draws (the norm estimate's, then one per
    step) reports training's progress, and so does every forward filling the shuffle buffer
    between them. SAELens's trainer has no per-step callback; its draws are the steps."""

    def __init__(self, total_draws: int, progress: Callable[[float], None]):
        self.total, self.progress, self.drawn = total_draws, progress, 0

    def forwards(self, stream: Iterator) -> Iterator:
        for item in stream:
            self.progress(self.drawn / self.total)
            yield item

    def draws(self, batches: Iterator) -> Iterator:
        for batch in batches:
            self.drawn += 1
            self.progress(self.drawn / self.total)
            yield batch


def train_saes(config: RunConfig, adapter: RewardModelAdapter, texts: list[str], run_dir: Path,
               progress: Callable[[float], None] | None = None) -> dict[int, Path]:
    """Train and save (SAELens format) one SAE per configured layer; returns layer -> directory.
    With sae.widths, a paired SAE of the smaller width per layer steps on the same batches and is
    saved under pair_dir. `progress` hears the share of training done at every step (and may raise to stop it)."""
    torch.manual_seed(config.seed)  # the shuffle buffer's draws (each SAE's initialisation has a seed of its own)
    ranks = distributed.current()
    owners = layer_owners(config.layers, ranks)
    hooks, saes = {}, {}
    pair_width = config.sae.pair_width
    pair_config = config.sae.model_copy(update={"width": pair_width}) if pair_width is not None else None
    for i, layer in enumerate(config.layers):
        if owners[layer] != ranks.rank:
            continue  # another rank trains it (workers/distributed_train.py)
        metadata = dict(model_name=config.model.path, hook_name=adapter.hook_name(layer), hook_layer=layer,
                        context_size=config.model.max_length)
        hooks[f"layer_{layer}"] = adapter.hook_name(layer)
        with seeded(config.seed + SAE_SEED_STRIDE * (i + 1), adapter.device):
            saes[f"layer_{layer}"] = build_training_sae(config.sae, adapter.d_model, str(adapter.device),
                                                        SAEMetadata(**metadata))
        if pair_config is not None:
            # the paired dictionary steps on the same batches as the main one, from a seed of its own
            hooks[pair_key(layer, pair_width)] = adapter.hook_name(layer)
            with seeded(config.seed + 1 + SAE_SEED_STRIDE * (i + 1), adapter.device):
                saes[pair_key(layer, pair_width)] = build_training_sae(pair_config, adapter.d_model,
                                                                       str(adapter.device), SAEMetadata(**metadata))
    # each layer's sinks, measured before training: left out of the stream, so of the norm estimate too
    sink_rules = measure_sink_rules(adapter, texts, config.layers, config.sinks, config.dataset.batch_size)
    cache_bytes = config.sae.cache_mb * 2**20
    if ranks.active:
        stream = sharded_activation_stream(adapter, texts, config.layers, config.dataset.batch_size, config.seed,
                                           sink_rules, ranks, owners, cache_bytes)
    else:
        stream = activation_stream(adapter, texts, config.layers, config.dataset.batch_size, config.seed, sink_rules,
                                   cache_bytes=cache_bytes)
    cfg = trainer_config(config.sae, adapter.device)
    draws = cfg.n_batches_for_norm_estimate + math.ceil(cfg.total_training_samples / cfg.train_batch_size_samples)
    if progress is not None:
        reporting = _Reporting(draws, progress)
        stream = reporting.forwards(stream)
    shuffled = shuffled_batches(stream, config.sae.buffer_tokens, config.sae.batch_size)
    if progress is not None:
        shuffled = reporting.draws(shuffled)
    if ranks.active:
        shuffled = own_hooks_only(shuffled, set(hooks.values()))
    if saes:
        trained = CentredStartTrainer(cfg=cfg, saes=saes, hook_names=hooks, data_provider=shuffled,
                                      centred=config.sae.decoder_bias_init == "mean").fit()
    else:  # more ranks than layers: this one only forwarded
        drain(shuffled, draws)
    saved = {}
    for layer in config.layers:
        if owners[layer] != ranks.rank:
            continue
        saved[layer] = [sae_dir(run_dir, layer)]
        trained[f"layer_{layer}"].save_inference_model(saved[layer][0])
        sink_rules[layer].save(saved[layer][0])
        if pair_width is not None:  # found again by pair_dir (workers/analyses/pairs.py loads them)
            saved[layer].append(pair_dir(run_dir, layer, pair_width))
            trained[pair_key(layer, pair_width)].save_inference_model(saved[layer][1])
            sink_rules[layer].save(saved[layer][1])
    if ranks.active:
        share_sae_files({layer: saved.get(layer, [sae_dir(run_dir, layer)]) for layer in config.layers}, owners,
                        run_dir, ranks)
    paths = {layer: sae_dir(run_dir, layer) for layer in config.layers}
    return paths


def load_sae(path: Path, device: torch.device) -> SAE:
    """A saved SAE with the sink rule it was trained under (workers/sinks.py) applied to its encode."""
    return with_sink_rule(SAE.load_from_disk(path, device=str(device)).eval(), SinkRule.load(path))


def load_saes(paths: dict[int, Path], device: torch.device) -> dict[int, SAE]:
    return {layer: load_sae(path, device) for layer, path in paths.items()}
