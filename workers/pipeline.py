"""config -> collect -> train -> analyse/regress -> publish -> register. One way, no going back."""
from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from backend.core.chat_roles import markers_info
from backend.core.db import register_run, upgrade
from backend.core.run_config import (
    DEMO_LLAMA_MODEL,
    DEMO_MODEL,
    DEMO_MODEL_DIRNAME,
    ConfigError,
    ModelFacts,
    RunConfig,
    check_against_world,
    check_model_facts,
    preflight,
)
from backend.core.settings import Settings
from backend.core.store_schema import STORE_FILENAME
from workers import distributed
from workers.adapters import adapter_from_config
from workers.analyses import check_analyses, run_analyses
from workers.analyses.transfer import prepare_transfer
from workers.analyze import collect_corpus_activations
from workers.chat import prepare_chat_texts
from workers.datasets import read_texts, select_corpus
from workers.demo_llama import ensure_demo_llama_rm
from workers.demo_model import build_demo_reward_model
from workers.device import pick_device
from workers.distributed_measure import finish as finish_measurements
from workers.distributed_measure import serve as serve_measurements
from workers.evaluate import evaluate_saes
from workers.layer_stages import LAYER_STAGES
from workers.preference_data import PreferencePairs
from workers.publish import registry_rows, with_best_layer, write_store
from workers.stages import RunContext, frame, part, run_layer_stages
from workers.staging import Toucher, clean_stale, previous_dir, staging_dir
from workers.train import load_saes, train_saes


def resolve_model_path(config: RunConfig, settings: Settings) -> str:
    if config.model.path == DEMO_LLAMA_MODEL:

        return str(ensure_demo_llama_rm(settings.models_dir, _stage))
    if config.model.path != DEMO_MODEL:
        return config.model.path
    path = settings.models_dir / DEMO_MODEL_DIRNAME
    if not path.is_dir():

        print(f"building the demo reward model in {path} (once)")
        report = build_demo_reward_model(path)
        print(f"demo reward model held-out R² vs the VADER reward: {report['heldout_r2']:.3f}")
    return str(path)


def peak_rss_mib() -> float:
    """This process' peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _use_dataset_rewards(config: RunConfig, adapter, corpus) -> None:
    """A causal LM scored by the dataset's reward column: every text needs its reward."""
    if config.model.adapter != "causal_lm" or config.model.reward_function != "dataset":
        return
    if corpus.rewards is None:
        raise ConfigError(f"model.reward_function: 'dataset' needs a reward column, and {config.dataset.source} has "
                          f"no column {config.dataset.reward_column!r} (dataset.reward_column)")
    if np.isnan(corpus.rewards).any():
        raise ConfigError(f"dataset.reward_column: {int(np.isnan(corpus.rewards).sum())} texts have no reward, "
                          "which model.reward_function 'dataset' needs")
    adapter.use_dataset_rewards(corpus.texts, corpus.rewards)


# Who else hears about stages and progress (a worker's job); set for the length of one run.
STAGE_LISTENER: ContextVar[Callable[[str], None] | None] = ContextVar("stage_listener", default=None)
PROGRESS_LISTENER: ContextVar[Callable[[float], None] | None] = ContextVar("progress_listener", default=None)

# Each phase's share of a run's progress bar, roughly its share of the time on the demo; within
# "layers", each layer's part is shared out by the per-layer stages' own shares (Stage.share).
SPANS = {"load": (0.0, 0.02), "train": (0.02, 0.55), "analyse": (0.55, 0.7), "recovery": (0.7, 0.75),
         "layers": (0.75, 0.93), "analyses": (0.93, 0.98), "write": (0.98, 1.0)}


PUBLISHING = "publishing the run"


def _stage(message: str) -> None:
    if not distributed.current().leader:  # one voice: rank 0's
        return
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    listener = STAGE_LISTENER.get()
    if listener is not None:
        listener(message)


def _span(stage: str) -> Callable[[float], None]:
    """A stage's progress (0..1 of its own work) as the run's. Every stage reports at least per
    batch or chunk, and each report is where a cancelled job stops (the listener raises)."""
    return part(_report, *SPANS[stage])


def _report(progress: float) -> None:
    listener = PROGRESS_LISTENER.get()
    if listener is not None:
        listener(progress)


def corpus_tables(corpus, acts) -> dict[str, dict]:
    """The texts, and every score the reward model read from them."""
    last_read = acts.last_read_per_text()
    return {
        "texts": {
            "text_id": np.arange(len(corpus.texts)),
            "split": np.where(corpus.heldout, "heldout", "train"),
            "text": corpus.texts,
            "reward": corpus.rewards if corpus.rewards is not None else [None] * len(corpus.texts),
            "score": acts.scores[last_read],
            "n_tokens": acts.tokens_per_text(),
            "reward_position": acts.read_positions[last_read],
            **response_span_columns(acts.response_spans, len(corpus.texts)),
        },
        "reward_reads": {
            "read_id": np.arange(acts.n_reads),
            "text_id": acts.read_text_ids,
            "position": acts.read_positions,
            "score": acts.scores,
        },
    }


def response_span_columns(spans: np.ndarray | None, n_texts: int) -> dict[str, list]:
    """A chat text's response as token indices [response_start, response_end); None elsewhere."""
    if spans is None:
        return {"response_start": [None] * n_texts, "response_end": [None] * n_texts}
    known = spans[:, 0] >= 0
    return {"response_start": [int(a) if ok else None for a, ok in zip(spans[:, 0], known)],
            "response_end": [int(b) if ok else None for b, ok in zip(spans[:, 1], known)]}


def build_tables(ctx: RunContext) -> None:
    """Every table the store is written from, into ctx.tables: the corpus's, then each layer
    through the per-layer stages (workers/layer_stages.py), their columns side by side."""
    ctx.tables.update(corpus_tables(ctx.corpus, ctx.acts))
    ctx.tables.update(frame(list(ctx.config.layers), {layer: sae.cfg.d_sae for layer, sae in ctx.saes.items()}))
    run_layer_stages(LAYER_STAGES, ctx)


def _register(settings: Settings, config: RunConfig, tables: dict, info: dict, replace: bool) -> None:
    # called once the run directory is in place: each SAE's fingerprint hashes the published file
    run_row, sae_rows = registry_rows(info, tables["layers"], Path("runs") / config.run_id, data_dir=settings.data_dir)
    register_run(settings, run_row, sae_rows, replace=replace)


def run_pipeline(config: RunConfig, settings: Settings, replace: bool = False,
                 on_stage: Callable[[str], None] | None = None,
                 on_progress: Callable[[float], None] | None = None) -> Path:
    """Run every stage; the run appears (directory + SQL row) only once all of it succeeded.
    `on_stage` hears each stage's message, `on_progress` the run's progress (0..1) at least once
    per batch or chunk of every stage; either may raise to stop the run (nothing is kept)."""
    tokens = STAGE_LISTENER.set(on_stage), PROGRESS_LISTENER.set(on_progress)
    try:
        return _run_pipeline(config, settings, replace)
    finally:
        STAGE_LISTENER.reset(tokens[0])
        PROGRESS_LISTENER.reset(tokens[1])


def _load_adapter(config: RunConfig, model_path: str, device):
    """The reward model; a checkpoint that does not load is the config's problem (model.path)."""
    try:
        adapter = adapter_from_config(config.model, model_path, device)
    except (OSError, ValueError) as exc:
        message = str(exc)
        if message.startswith("model."):  # the adapters name the key themselves
            raise ConfigError(message) from None
        raise ConfigError(f"model.path: cannot load a reward model from {config.model.path!r}: {message}") from None
    if config.model.loader is not None:  # a loader's model is only known once built: its depth now
        check_model_facts(config, ModelFacts(adapter.n_layers, adapter.max_positions))
    return adapter


def explained_output_info(adapter) -> dict:
    """The run's record of the head output it explains (model.output); {} for a one-output head."""
    output = getattr(adapter, "output", None)
    return output.record() if output is not None else {}


def _run_pipeline(config: RunConfig, settings: Settings, replace: bool) -> Path:
    ranks = distributed.current()  # several processes: README, "Several processes"
    if ranks.leader:  # the SQL database and the runs directory are rank 0's
        upgrade(settings)
        for line in clean_stale(settings.runs_dir):
            _stage(line)
        # every check before any compute: the config against this deployment's limits and the model's
        # config, the device, the dataset's rows (before the demo model is built, which takes minutes)
        preflight(config, settings, replace)
    device = ranks.device(pick_device(config.device))
    texts, rewards = read_texts(config.dataset, config.seed, config.model.step_separator)
    model_path = distributed.leader_first(lambda: resolve_model_path(config, settings))
    check_against_world(config, model_path)
    chat_markers = None
    if not isinstance(texts, PreferencePairs):  # pairs are rendered with the tokenizer, as pairs (preference_data)
        texts, chat_markers = prepare_chat_texts(texts, model_path, config.dataset, config.analysis)
    written = config  # what the user wrote, layers: {top_divergence: k} included: config_yaml keeps it
    # the base model's tokenizer and depth, its parameter divergence, the layers it chooses
    config, divergence = prepare_transfer(config, model_path, _stage)

    started = time.time()
    torch.manual_seed(config.seed)
    final_dir = settings.run_dir(config.run_id)
    staging = staging_dir(settings.runs_dir, config.run_id) if ranks.leader else Path(
        tempfile.mkdtemp(prefix=f"rewardatlas-rank{ranks.rank}-"))  # the other ranks' copies of the SAEs
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    touch = Toucher(staging)
    outer = PROGRESS_LISTENER.get()

    def on_progress(progress: float) -> None:
        touch()
        if outer is not None:
            outer(progress)

    token = PROGRESS_LISTENER.set(on_progress)
    try:
        _stage(f"loading {model_path} on {device}")
        adapter = _load_adapter(config, model_path, device)
        if getattr(adapter, "output", None) is not None:
            _stage(f"explaining the head's {adapter.output.describe()} (model.output)")
        adapter.response_markers = chat_markers  # analysis.tokens: response reads the response's tokens only
        check_analyses(config, adapter.tokenizer)  # e.g. a vocabulary with no known token: before training
        corpus = select_corpus(texts, rewards, config.dataset, config.seed, adapter.tokenizer,
                               config.model.max_length, settings.max_texts)
        del texts, rewards  # the whole dataset: only the corpus taken from it is needed from here
        _use_dataset_rewards(config, adapter, corpus)
        train_texts = [t for t, held in zip(corpus.texts, corpus.heldout) if not held]
        _stage(f"training {len(config.layers)} SAEs (layers {config.layers}) on {config.sae.training_tokens:,} tokens")
        sae_paths = train_saes(config, adapter, train_texts, staging, progress=_span("train"))
        _stage(f"analysing {len(corpus.texts):,} texts")
        saes = load_saes(sae_paths, device)  # exactly what was saved: proves the files load
        acts = collect_corpus_activations(adapter, saes, corpus.texts, corpus.heldout,
                                          config.dataset.batch_size, config.regression.pooling, corpus.rewards,
                                          config.analysis, config.seed, progress=_span("analyse"))
        if not ranks.leader:  # its share is with rank 0; what is left to share is the measure stage
            serve_measurements(adapter, saes, [t for t, held in zip(corpus.texts, corpus.heldout) if held])
            shutil.rmtree(staging, ignore_errors=True)
            return final_dir
        _stage(f"analysis pass done: reward effect from {acts.n_effect_texts:,} texts' gradients, "
               f"peak RSS {peak_rss_mib():,.0f} MiB")
        eval_texts = [t for t, held in zip(corpus.texts, corpus.heldout) if held][: config.sae.reward_recovered_texts]
        _stage(f"reward recovered: {len(eval_texts)} held-out texts with each SAE spliced in, and each layer zeroed")
        recovery = evaluate_saes(adapter, saes, eval_texts, config.dataset.batch_size, progress=_span("recovery"))
        ctx = RunContext(config, settings, adapter, corpus, acts, saes, staging, device, tables={}, stage=_stage,
                         progress=_span("layers"), sae_paths=sae_paths, recovery=recovery, divergence=divergence)
        build_tables(ctx)
        with distributed.solo():  # rank 0 alone
            analysed = run_analyses(dataclasses.replace(ctx, progress=_span("analyses")))
        tables = ctx.tables
        _span("write")(0.0)
        # what the user wrote (plus the run id): parses again as it is, defaults included
        config_yaml = yaml.safe_dump({"run_id": config.run_id, **written.model_dump(mode="json", exclude_unset=True)},
                                     sort_keys=False)
        info = {
            "run_id": config.run_id, "name": config.name, "model": config.model.path,
            "adapter": config.model.adapter, "dataset": config.dataset.source, "config_yaml": config_yaml,
            "created_at": datetime.now(timezone.utc).isoformat(), "n_texts": len(corpus.texts),
            "n_tokens": acts.n_tokens, "device": str(device), "ranked_texts": config.analysis.ranked_texts,
            **explained_output_info(adapter), **markers_info(chat_markers), **analysed,
        }
        info = with_best_layer(info, tables["layers"])
        _stage("writing the feature store")
        write_store(staging / STORE_FILENAME, info, tables)
        (staging / "config.yaml").write_text(config_yaml)
        finish_measurements()  # every rank is done and well: publish
        _stage(PUBLISHING)  # the last point where a stop leaves nothing: the job asks the queue now
        _publish(staging, final_dir, lambda: _register(settings, config, tables, info, replace))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        PROGRESS_LISTENER.reset(token)
    _stage(f"run {config.run_id!r} done in {time.time() - started:.0f} s (peak RSS {peak_rss_mib():,.0f} MiB): {final_dir}")
    return final_dir


def _publish(staging: Path, final_dir: Path, register) -> None:
    """Rename the finished run into place, then register it; undo the rename if that fails."""
    previous = previous_dir(final_dir)
    if final_dir.exists():
        final_dir.rename(previous)
        os.utime(previous)  # fresh: another host's clean-up judges it by age (workers/staging.py)
    staging.rename(final_dir)
    try:
        register()
    except BaseException:
        final_dir.rename(staging)
        if previous.exists():
            previous.rename(final_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)
