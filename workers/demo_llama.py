"""The LLaMA-family demo reward model: SmolLM2-135M-Instruct (workers/llama_backbone.py) as a
`LlamaForSequenceClassification` whose scalar head is fitted as reward models are trained: the
Bradley–Terry loss −log σ(r(chosen) − r(rejected)) on chat-formatted preference pairs from the
demo's generator (workers/demo_pairs.py), body frozen, on cached last-token features
(workers/bradley_terry.py). A full fine-tune step of the body takes seconds on a CPU; the head
fit over cached features takes one forward per text.

Also the demo's chat corpus: a prompt asking for a review and a generated review as the
response, with the review's demo (VADER lexicon) reward.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from backend.core.run_config import DEMO_LLAMA_DIRNAME
from workers.bradley_terry import fit_bradley_terry
from workers.chat import render_chat, require_chat_template
from workers.demo_corpus import generate_corpus, vader_reward
from workers.demo_pairs import generate_pairs, review_prompt

BUILD_SEED = 4321  # pairs drawn apart from the pipeline's corpus
BACKBONE_DIRNAME = "smollm2-135m-instruct"


def demo_chat_rows(n_texts: int, seed: int) -> list[dict]:
    """`n_texts` rows {prompt, response, reward}: a review request and a generated review."""
    rng = random.Random(seed)
    return [{"prompt": review_prompt(rng), "response": text, "reward": vader_reward(text)}
            for text in generate_corpus(n_texts, seed=seed)]


def last_token_features(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """[n, d] float32: the body's final hidden state (after its last norm) at each text's last
    token: exactly what the sequence-classification head reads."""
    import torch  # lazy: torch loads only to build the model; the demo-chat corpus (workers/datasets.py) needs none

    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            hidden = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            last = enc["attention_mask"].sum(1) - 1  # right padding
            out.append(hidden[torch.arange(len(last)), last].float().numpy())
    return np.concatenate(out)


def build_demo_llama_rm(out_dir: Path, backbone_dir: Path, n_pairs: int = 1000, max_length: int = 128,
                        batch_size: int = 32, heldout_fraction: float = 0.2) -> dict:
    """The demo LLaMA RM saved as a HF directory at out_dir (written to a temp dir, then renamed);
    returns the head fit's report (pairwise accuracy on training and held-out pairs)."""
    # lazy: torch and transformers load only to build the model; the demo-chat corpus needs neither
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification  # lazy: transformers, only to build the model

    from workers.llama_backbone import convert_smollm2  # lazy: torch and transformers, only to build

    started = time.time()
    backbone = convert_smollm2(backbone_dir)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    template = require_chat_template(tokenizer, "model.path")
    torch.manual_seed(BUILD_SEED)
    model = LlamaForSequenceClassification.from_pretrained(backbone, num_labels=1, torch_dtype=torch.bfloat16).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = generate_pairs(n_pairs, seed=BUILD_SEED)
    sides = {side: [render_chat(tokenizer, pair["prompt"] + pair[side], template).text for pair in pairs]
             for side in ("chosen", "rejected")}
    features = {side: last_token_features(model, tokenizer, texts, max_length, batch_size)
                for side, texts in sides.items()}
    fit = fit_bradley_terry(features["chosen"], features["rejected"], heldout_fraction=heldout_fraction,
                            seed=BUILD_SEED, C=None)
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(fit.weights).float().unsqueeze(0))
    report = {"n_pairs": n_pairs, "train_pairwise_accuracy": fit.train_accuracy,
              "heldout_pairwise_accuracy": fit.heldout_accuracy, "n_heldout_pairs": len(fit.heldout_index),
              "loss": "Bradley-Terry, body frozen, on last-token features", "seconds": round(time.time() - started, 1)}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rewardatlas_build.json").write_text(json.dumps(report, indent=2))
    tmp.rename(out_dir)
    return report


def ensure_demo_llama_rm(models_dir: Path, report=print, **build) -> Path:
    """The demo LLaMA RM's directory under models_dir, built once (`build`: build_demo_llama_rm's
    keywords); the converted backbone is kept beside it."""
    path = Path(models_dir) / DEMO_LLAMA_DIRNAME
    if not (path / "config.json").is_file():
        report(f"building the demo LLaMA reward model in {path} (once)")
        fit = build_demo_llama_rm(path, Path(models_dir) / BACKBONE_DIRNAME, **build)
        report(f"demo LLaMA RM: Bradley-Terry head on {fit['n_pairs']} pairs, held-out pairwise accuracy "
               f"{fit['heldout_pairwise_accuracy']:.3f} (train {fit['train_pairwise_accuracy']:.3f}), {fit['seconds']:.0f} s")
    return path
