"""Reward-model adapters behind one interface (see base.py)."""
from __future__ import annotations

import torch
import transformers
from transformers import AutoTokenizer

from workers.adapters.base import Batch, RewardModelAdapter, StopForward
from workers.adapters.causal_lm import CausalLMRewardAdapter
from workers.adapters.custom import CustomRewardAdapter, CustomRewardModel, load_custom_adapter
from workers.adapters.process import ProcessRewardAdapter
from workers.adapters.seq_cls import SequenceClassifierAdapter

ADAPTERS = {
    "seq_cls": SequenceClassifierAdapter,
    "process": ProcessRewardAdapter,
    "causal_lm": CausalLMRewardAdapter,
    "custom": CustomRewardAdapter,  # built by a model.loader (load_custom_adapter), not from a HF checkpoint
}


def _model_class(kind: str, path: str, trust_remote_code: bool = False):
    if kind == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    if kind == "process":
        architectures = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures or []
        if any(name.endswith("ForTokenClassification") for name in architectures):
            return transformers.AutoModelForTokenClassification
    return transformers.AutoModelForCausalLM


def load_adapter(kind: str, path: str, device: torch.device, max_length: int, trust_remote_code: bool = False,
                 dtype: str = "float32",
                 **options) -> RewardModelAdapter:
    """Load a checkpoint for one adapter family. `options` are the family's own settings:
    process: step_separator, good_token, bad_token; causal_lm: reward_function; seq_cls:
    output, output_score. `trust_remote_code` runs the code a HF directory ships."""
    if kind not in ADAPTERS or kind == "custom":
        raise ValueError(f"model.adapter: {kind!r} is not one of {', '.join(k for k in ADAPTERS if k != 'custom')}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model.path: the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = _model_class(kind, path, trust_remote_code).from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                         torch_dtype=getattr(torch, dtype))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return ADAPTERS[kind](model, tokenizer, device, max_length, **options)


def adapter_options(model_config) -> dict:
    """The family-specific settings of a config's `model` section."""
    if model_config.adapter == "process":
        return {"step_separator": model_config.step_separator, "good_token": model_config.good_token,
                "bad_token": model_config.bad_token}
    if model_config.adapter == "causal_lm":
        return {"reward_function": model_config.reward_function}
    if model_config.adapter in ("seq_cls", "custom"):
        return {"output": model_config.output, "output_score": model_config.output_score}
    return {}


def adapter_from_config(model_config, path: str, device: torch.device) -> RewardModelAdapter:
    """The adapter a run config's `model` section describes (`path` resolved, e.g. for 'demo')."""
    if model_config.loader is not None:
        return load_custom_adapter(model_config.loader, path, device, model_config.max_length,
                                   **adapter_options(model_config))
    return load_adapter(model_config.adapter, path, device, model_config.max_length,
                        trust_remote_code=model_config.trust_remote_code, dtype=model_config.dtype,
                        **adapter_options(model_config))


__all__ = ["ADAPTERS", "Batch", "CustomRewardModel", "RewardModelAdapter", "StopForward", "adapter_from_config", "adapter_options",
           "load_adapter"]
