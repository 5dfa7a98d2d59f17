"""Reward-model adapters behind one interface (see base.py)."""
from __future__ import annotations

import torch

from workers.adapters.base import Batch, RewardModelAdapter, StopForward
from workers.adapters.causal_lm import CausalLMRewardAdapter
from workers.adapters.process import ProcessRewardAdapter
from workers.adapters.seq_cls import SequenceClassifierAdapter

ADAPTERS = {
    "seq_cls": SequenceClassifierAdapter,
    "process": ProcessRewardAdapter,
    "causal_lm": CausalLMRewardAdapter,
}


def _model_class(kind: str, path: str):
    import transformers

    if kind == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    if kind == "process":
        architectures = transformers.AutoConfig.from_pretrained(path).architectures or []
        if any(name.endswith("ForTokenClassification") for name in architectures):
            return transformers.AutoModelForTokenClassification
    return transformers.AutoModelForCausalLM


def load_adapter(kind: str, path: str, device: torch.device, max_length: int, dtype: str = "float32",
                 **options) -> RewardModelAdapter:
    """Load a checkpoint for one adapter family. `options` are the family's own settings:
    process: step_separator, good_token, bad_token; causal_lm: reward_function."""
    from transformers import AutoTokenizer

    if kind not in ADAPTERS:
        raise ValueError(f"model.adapter: {kind!r} is not one of {', '.join(ADAPTERS)}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model.path: the tokenizer of {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model = _model_class(kind, path).from_pretrained(path, torch_dtype=getattr(torch, dtype))
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
    return {}


def adapter_from_config(model_config, path: str, device: torch.device) -> RewardModelAdapter:
    """The adapter a run config's `model` section describes (`path` resolved, e.g. for 'demo')."""
    return load_adapter(model_config.adapter, path, device, model_config.max_length, model_config.dtype,
                        **adapter_options(model_config))


__all__ = ["ADAPTERS", "Batch", "RewardModelAdapter", "StopForward", "adapter_from_config", "adapter_options",
           "load_adapter"]
