"""Train one SAE per layer with SAELens's MultiSAETrainer, from one shared activation stream."""
from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.mixing_buffer import multi_hook_concat_split_iter
from sae_lens.training.multi_sae_trainer import MultiSAETrainer

from workers.adapters import RewardModelAdapter
from workers.collect import activation_stream
from workers.config import RunConfig

NORM_ESTIMATE_BATCHES = 20


def sae_dir(run_dir: Path, layer: int) -> Path:
    return run_dir / "saes" / f"layer_{layer}"


def build_training_sae(config: RunConfig, adapter: RewardModelAdapter, layer: int) -> TopKTrainingSAE:
    sae_cfg = TopKTrainingSAEConfig(
        d_in=adapter.d_model,
        d_sae=config.sae.width,
        k=config.sae.k,
        device=str(adapter.device),
        # scale inputs to unit expected norm while training; SAELens folds it back afterwards
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(
            model_name=config.model.path,
            hook_name=adapter.hook_name(layer),
            hook_layer=layer,
            context_size=config.model.max_length,
        ),
    )
    return TopKTrainingSAE(sae_cfg)


def train_saes(config: RunConfig, adapter: RewardModelAdapter, texts: list[str], run_dir: Path) -> dict[int, Path]:
    """Train and save (SAELens format) one SAE per configured layer; returns layer -> directory."""
    torch.manual_seed(config.seed)
    hooks = {f"layer_{layer}": adapter.hook_name(layer) for layer in config.layers}
    saes = {name: build_training_sae(config, adapter, layer) for name, layer in zip(hooks, config.layers)}
    stream = activation_stream(adapter, texts, config.layers, config.dataset.batch_size, config.seed)
    shuffled = multi_hook_concat_split_iter(
        buffer_size=config.sae.buffer_tokens,
        batch_size=config.sae.batch_size,
        activations_loader=stream,
        hook_names=list(hooks.values()),
    )
    n_steps = config.sae.training_tokens // config.sae.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=config.sae.training_tokens,
        train_batch_size_samples=config.sae.batch_size,
        lr=config.sae.lr,
        lr_end=config.sae.lr / 10,
        lr_decay_steps=n_steps // 5,  # linear decay over the last fifth
        device=str(adapter.device),
        autocast=adapter.device.type == "cuda",
        n_batches_for_norm_estimate=NORM_ESTIMATE_BATCHES,
        dead_feature_window=max(1, min(1000, n_steps // 4)),
        feature_sampling_window=max(1, min(2000, n_steps // 2)),
    )
    trainer = MultiSAETrainer(cfg=trainer_cfg, saes=saes, hook_names=hooks, data_provider=shuffled)
    trained = trainer.fit()
    paths = {}
    for name, layer in zip(hooks, config.layers):
        paths[layer] = sae_dir(run_dir, layer)
        trained[name].save_inference_model(paths[layer])
    return paths


def load_saes(paths: dict[int, Path], device: torch.device) -> dict[int, SAE]:
    return {layer: SAE.load_from_disk(path, device=str(device)).eval() for layer, path in paths.items()}
