"""Shared by P1 and P2: the demo run's SAE and reward model, a corpus of a given token count,
our one-pass analysis, and SAEDashboard's SaeVisRunner on the same SAE and tokens.

SaeVisRunner needs a TransformerLens model. The reward model is a BERT, so it is loaded into
a HookedEncoder (its encoder weights; the MLM head is unused) that learns `stop_at_layer`,
which SAEDashboard passes and HookedEncoder otherwise ignores. The SAE reads layer L's
output, i.e. `blocks.L.hook_normalized_resid_post` there. SaeVisRunner takes a rectangle of
token ids, so the same texts' tokens are packed into rows of the model's max length: the
same token count and token ids as our pass (contexts differ only where rows join texts).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from backend.core.settings import Settings
from backend.core.run_config import AnalysisConfig, DEMO_MODEL_DIRNAME


def add_common_args(parser) -> None:
    parser.add_argument("--run", default="demo", help="run id whose SAE is analysed (under the data dir)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--model", default=None, help="reward model directory (default: the demo RM)")
    parser.add_argument("--tokens", type=int, default=65_536, help="corpus size, in tokens")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="texts per batch in our pass")
    parser.add_argument("--features", type=int, default=50, help="features SaeVisRunner builds")
    parser.add_argument("--reward-effect-texts", type=int, default=2048)


def load_world(args):
    from sae_lens import SAE

    from workers.adapters import load_adapter

    settings = Settings()
    model = args.model or str(settings.models_dir / DEMO_MODEL_DIRNAME)
    sae_path = settings.run_dir(args.run) / "saes" / f"layer_{args.layer}"
    if not sae_path.is_dir():
        raise SystemExit(f"no SAE at {sae_path}: run `rewardatlas demo` first or pass --run")
    adapter = load_adapter("seq_cls", model, torch.device("cpu"), args.max_length)
    sae = SAE.load_from_disk(sae_path, device="cpu").eval()
    return adapter, sae, model


def corpus_of(tokenizer, n_tokens: int, max_length: int, seed: int = 11) -> tuple[list[str], list[list[int]]]:
    """Demo-style texts until their token count reaches n_tokens, with their token ids."""
    from workers.demo_corpus import generate_corpus

    texts, ids, total = [], [], 0
    pool = generate_corpus(max(200, n_tokens // 8), seed=seed)
    for text in pool:
        row = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        texts.append(text)
        ids.append(row)
        total += len(row)
        if total >= n_tokens:
            break
    return texts, ids


def run_ours(adapter, sae, layer: int, texts: list[str], args) -> tuple[float, dict, dict]:
    """Our whole analysis of every feature: one pass (scores, features, reward effect) plus the
    store's columns. Returns seconds, feature columns and context columns."""
    from workers.analyze import collect_corpus_activations, feature_tables

    vocab = np.array(adapter.tokenizer.convert_ids_to_tokens(list(range(len(adapter.tokenizer)))), dtype=object)
    analysis = AnalysisConfig(reward_effect_texts=args.reward_effect_texts)
    start = time.perf_counter()
    acts = collect_corpus_activations(adapter, {layer: sae}, texts, np.zeros(len(texts), bool), args.batch_size,
                                      "sum", None, analysis, seed=0)
    features, contexts = feature_tables(layer, acts.layers[layer], vocab)
    return time.perf_counter() - start, features, contexts


def time_forward_only(adapter, texts: list[str], batch_size: int) -> float:
    """Seconds for the reward model's scoring forward alone over `texts`, batched as our pass
    batches them: the floor under any analysis that needs the score of every text."""
    from workers.batching import length_bucketed_batches, token_lengths

    batches = length_bucketed_batches(token_lengths(adapter.tokenizer, texts, adapter.max_length), batch_size, None)
    start = time.perf_counter()
    with torch.no_grad():
        for indices in batches:
            adapter.score(adapter.tokenize([texts[i] for i in indices]))
    return time.perf_counter() - start


def time_forward_to_layer(model, tokens: torch.Tensor, layer: int, batch_size: int = 64) -> float:
    """Seconds for the HookedEncoder's forward up to `layer` over `tokens`: the floor under
    SaeVisRunner, which runs that forward for every minibatch of features."""
    start = time.perf_counter()
    with torch.no_grad():
        for rows in tokens.split(batch_size):
            model(rows, stop_at_layer=layer + 1)
    return time.perf_counter() - start


def packed_tokens(ids: list[list[int]], row_length: int) -> torch.Tensor:
    flat = np.concatenate(ids)
    n_rows = len(flat) // row_length
    return torch.from_numpy(flat[: n_rows * row_length].reshape(n_rows, row_length)).long()


def hooked_encoder(model_path: str, tokenizer):
    """The reward model's BERT encoder as a TransformerLens HookedEncoder that can stop early."""
    from transformer_lens import HookedEncoder, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.bert import convert_bert_weights
    from transformers import AutoConfig, BertForPreTraining

    hf = AutoConfig.from_pretrained(model_path)
    cfg = HookedTransformerConfig(
        d_model=hf.hidden_size, d_head=hf.hidden_size // hf.num_attention_heads, n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size, n_layers=hf.num_hidden_layers, n_ctx=hf.max_position_embeddings,
        eps=hf.layer_norm_eps, d_vocab=hf.vocab_size, act_fn="gelu", attention_dir="bidirectional",
        original_architecture="BertForMaskedLM", device="cpu",
    )

    class StoppingEncoder(HookedEncoder):
        def forward(self, input, return_type="logits", token_type_ids=None, one_zero_attention_mask=None,
                    stop_at_layer=None):
            if stop_at_layer is None:
                return super().forward(input, return_type, token_type_ids, one_zero_attention_mask)
            resid = self.hook_full_embed(self.embed(input.to(self.cfg.device), token_type_ids))
            for block in self.blocks[:stop_at_layer]:
                resid = block(resid, None)
            return resid

    model = StoppingEncoder(cfg, tokenizer=tokenizer)
    bert = BertForPreTraining.from_pretrained(model_path)  # the RM's encoder; the MLM head is unused
    model.load_state_dict(convert_bert_weights(bert, cfg), strict=False)
    return model.eval()


def run_saedashboard(model, sae, layer: int, tokens: torch.Tensor, features: list[int], json_path: Path | None):
    """SaeVisRunner's dashboard data for `features`; returns (seconds, SaeVisData)."""
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner

    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", None) is False:
        # SaeVisRunner first folds the decoder norms into the encoder, which SAELens refuses for
        # a TopK SAE trained without decoder-norm rescaling (it could change which k are on).
        # Such an SAE's activations are already what it computes, so that step is skipped; it
        # is a one-off weight update, nothing the timing depends on.
        sae.fold_W_dec_norm = lambda: None
    config = SaeVisConfig(hook_point=f"blocks.{layer}.hook_normalized_resid_post", features=features,
                          minibatch_size_features=64, minibatch_size_tokens=64, device="cpu", dtype="float32")
    start = time.perf_counter()
    data = SaeVisRunner(config).run(encoder=sae, model=model, tokens=tokens)
    seconds = time.perf_counter() - start
    if json_path is not None:
        data.save_json(json_path)
    return seconds, data


def live_features(sae, adapter, texts: list[str], n: int, layer: int) -> list[int]:
    """n features that fire on the corpus' first texts (dead ones make an empty dashboard)."""
    batch = adapter.tokenize(texts[:256])
    _, captured = adapter.run(batch, capture=[layer], need_score=False)
    with torch.no_grad():
        fired = (sae.encode(captured[layer][batch.attention_mask.bool()]) > 0).sum(0)
    return torch.nonzero(fired).squeeze(1)[:n].tolist()
