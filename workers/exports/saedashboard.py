"""SAEDashboard's own page for one feature, rendered by the sae-dashboard package (SaeVisRunner) from
the run's SAE and reward model, over the run's corpus texts.

SaeVisRunner wants a TransformerLens model: `hook_dict`, `run_with_hooks(tokens, stop_at_layer,
fwd_hooks)`, `W_U`, `tokenizer`. DESIGN.md's route for MiniLM converts the weights into a
HookedEncoder; RewardModelLens instead answers those calls with the run's own adapter, so every
family a run can have (BERT, GPT-2, LLaMA, a custom loader) renders the same way, tokenised,
padded and hooked exactly as the run was (layer L = the residual stream after block L). Reward
models have no unembedding, so the logit tables read the input embedding matrix (the tied-embedding
convention): which tokens' embeddings the feature's decoder direction points along.

Two of the runner's habits are undone. It first folds the decoder norms into the encoder, which
rescales every activation (and SAELens refuses for a TopK SAE trained without decoder-norm
rescaling, as this project's are): the page shows the SAE's own activations instead, the numbers
every other page of the run shows. And its page loads d3 and plotly from CDNs: both are inlined, so
it opens offline.
"""
from __future__ import annotations

import html
import importlib.resources
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable
from urllib.parse import quote

import torch
from transformer_lens.hook_points import HookPoint

from backend.core import store
from backend.core.exports import ExportError
from backend.core.exports.atomic import atomic_file
from backend.core.exports.dashboards import dashboard_path
from backend.core.exports.source import LayerSource, chosen_features, open_layer, require_sae
from workers.adapters.base import Batch, last_token_positions, whole_text_segments
from workers.train import load_sae
from workers.job_errors import JobFailed

# d3-selection 3.0.1 (ISC licence: d3-selection.LICENSE beside it), from the npm registry: the page
# loads all of d3 v6 from a CDN but calls only d3.select / d3.selectAll, which it provides
D3_SELECTION = Path(__file__).with_name("d3-selection.min.js")
D3_CDN = '<script src="https://d3js.org/d3.v6.min.js"></script>'
PLOTLY_CDN = '<script src="https://cdn.plot.ly/plotly-latest.min.js"></script>'
DEFAULT_TEXTS = 1024
TOKEN_MINIBATCH = 64  # texts per forward


@dataclass
class Rendered:
    path: Path
    n_texts: int
    n_tokens: int
    seconds: float
    bytes: int


class VocabTokenizer:
    """The run's tokenizer with the `vocab` dict SAEDashboard decodes token ids through, spelled as
    the text reads: WordPiece's "##" continuations attached, other WordPiece tokens after a space
    (byte-level BPE's "Ġ" SAEDashboard turns into a space itself), padding as nothing."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        wordpiece = any(t and t.startswith("##") for t in tokens)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.vocab = {}
        for i, token in enumerate(tokens):
            if token is None:
                continue
            if i == pad:
                token = ""
            elif wordpiece:
                token = token[2:] if token.startswith("##") else " " + token
            self.vocab.setdefault(token, i)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


class RewardModelLens:
    """The TransformerLens calls SaeVisRunner makes, answered by the run's adapter at one layer.
    Token rows come back from the runner without their attention masks: each row's mask is looked up
    by its ids (identical rows have identical masks)."""

    def __init__(self, adapter, layer: int, rows: torch.Tensor, masks: torch.Tensor,
                 on_forward: Callable[[], None] | None = None):
        self.adapter, self.layer, self.on_forward = adapter, layer, on_forward
        self.hook_name = adapter.hook_name(layer)
        self.hook_dict = {self.hook_name: HookPoint()}
        self.tokenizer = VocabTokenizer(adapter.tokenizer)
        self.cfg = SimpleNamespace(n_heads=1, device=str(adapter.device))
        self.W_U = unembedding(adapter)
        self._masks = {row.numpy().tobytes(): mask for row, mask in zip(rows, masks)}

    def run_with_hooks(self, tokens: torch.Tensor, stop_at_layer: int | None = None, fwd_hooks=(), **_ignored):
        tokens = tokens.cpu()
        mask = torch.stack([self._masks[row.numpy().tobytes()] for row in tokens])
        device = self.adapter.device
        batch = Batch([""] * len(tokens), tokens.to(device), mask.to(device),
                      torch.stack([torch.arange(len(tokens)), last_token_positions(mask)], 1).to(device),
                      whole_text_segments(mask).to(device))
        _, captured = self.adapter.run(batch, capture=[self.layer], need_score=False)
        acts = captured[self.layer].float()
        for name, hook in fwd_hooks:
            hook(acts, hook=self.hook_dict[name])
        if self.on_forward is not None:
            self.on_forward()
        return acts


def unembedding(adapter) -> torch.Tensor:
    """[d_model, d_vocab]: the input embedding matrix, transposed; zeros where the model has none."""
    embeddings = getattr(adapter.model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.shape[1] == adapter.d_model:
        return weight.detach().float().T.cpu()
    return torch.zeros(adapter.d_model, len(adapter.tokenizer))


def whole_text_layout():
    """SAEDashboard's feature page with each example a whole text: its default window (5 tokens
    either side) skips every peak in a text's first 6 tokens, and reward-model texts are short."""
    # lazy: SAEDashboard (0.5 s) loads only when a page is rendered, not with the worker
    from sae_dashboard.components_config import (ActsHistogramConfig, Column, FeatureTablesConfig,
                                                 LogitsHistogramConfig, LogitsTableConfig, SequencesConfig)
    from sae_dashboard.layout import SaeVisLayoutConfig  # lazy: SAEDashboard, only to render

    return SaeVisLayoutConfig(columns=[Column(FeatureTablesConfig()),
                                       Column(ActsHistogramConfig(), LogitsTableConfig(), LogitsHistogramConfig()),
                                       Column(SequencesConfig(stack_mode="stack-none", buffer=None))], height=750)


def special_ids(tokenizer) -> set[int]:
    """Token ids the run's pages never read a feature on: special tokens and padding."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or getattr(tokenizer, "special_ids", None) or ())
    if getattr(tokenizer, "pad_token_id", None) is not None:
        ids.add(int(tokenizer.pad_token_id))
    return {int(i) for i in ids}


def _inline_assets(page: str) -> str:
    """SAEDashboard's page with its CDN scripts inlined and its data unable to close its script tag."""
    d3 = D3_SELECTION.read_text()
    plotly = importlib.resources.files("plotly").joinpath("package_data/plotly.min.js").read_text()
    if D3_CDN not in page or PLOTLY_CDN not in page:
        raise RuntimeError("the sae-dashboard page no longer loads d3 and plotly as expected: check the pinned version")
    start = page.index("function defineData()")
    end = page.index("</script>", start)
    page = page[:start] + page[start:end].replace("</", "<\\/") + page[end:]  # text in the data stays text
    return page.replace(D3_CDN, f"<script>{d3}</script>").replace(PLOTLY_CDN, f"<script>{plotly}</script>")


def _header(source: LayerSource, feature: int, n_texts: int, n_tokens: int) -> str:
    """What the page is, and what the feature does to the reward (the store's numbers)."""
    card = store.feature(source.store_path, source.layer, feature)

    def num(name: str, digits: int = 4) -> str:
        value = card.get(name)
        return "n/a" if value is None else f"{value:.{digits}g}"

    measured = (f"{num('measured_delta')} (95% CI {num('measured_delta_low')} to {num('measured_delta_high')}, "
                f"{card.get('measured_n') or 0} reads)" if card.get("measured_n") else "not measured")
    facts = [("run", source.run_id), ("layer", str(source.layer)), ("feature", str(feature)),
             ("regression weight", num("weight")), ("attribution", num("attribution")),
             ("effect per unit", num("reward_effect")), ("measured Δ zeroed", measured),
             ("read on", f"{n_texts:,} corpus texts, {n_tokens:,} tokens")]
    items = "".join(f"<span><b>{html.escape(k)}</b> {html.escape(v)}</span> " for k, v in facts)
    return (f"<div id='rewardatlas-header' style='font-family:sans-serif;font-size:13px;padding:6px 10px;"
            f"border-bottom:1px solid #ccc;display:flex;flex-wrap:wrap;gap:14px'>{items}</div>\n")


def render(source: LayerSource, adapter, sae, feature: int, out: Path, n_texts: int = DEFAULT_TEXTS,
           progress: Callable[[float], None] | None = None, replace: bool = True) -> Rendered:
    """The feature's SAEDashboard page at `out` (written whole, or not at all)."""
    # lazy: SAEDashboard (0.5 s) loads only when a page is rendered, not with the worker
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig  # lazy: SAEDashboard, only to render
    from sae_dashboard.sae_vis_runner import SaeVisRunner  # lazy: SAEDashboard, only to render

    started = time.perf_counter()
    chosen_features(source, [feature])
    texts = [row["text"] for row in store.texts(source.store_path, None, n_texts)]
    if not texts:
        raise ExportError(f"run {source.run_id!r} has no texts to read the feature on")
    batch = adapter.tokenize(texts)
    rows, masks = batch.input_ids.cpu(), batch.attention_mask.cpu()
    n_minibatches, done = -(-len(rows) // TOKEN_MINIBATCH), [0]

    def forward_done():
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / n_minibatches, 1.0))

    lens = RewardModelLens(adapter, source.layer, rows, masks, forward_done)
    sae.fold_W_dec_norm = lambda: None  # the SAE's own activations (module docstring)
    config = SaeVisConfig(hook_point=lens.hook_name, features=[feature], minibatch_size_features=1,
                          minibatch_size_tokens=TOKEN_MINIBATCH, device=str(adapter.device), dtype="float32",
                          ignore_tokens=special_ids(adapter.tokenizer), verbose=False,
                          feature_centric_layout=whole_text_layout())
    data = SaeVisRunner(config).run(encoder=sae, model=lens, tokens=rows)
    n_tokens = int(masks.sum())
    with atomic_file(out, replace=replace) as work:
        page_file = work.with_suffix(".html")  # SAEDashboard insists on the suffix
        try:
            save_feature_centric_vis(data, filename=page_file, feature_idx=feature)
            page = _inline_assets(page_file.read_text())
        finally:
            page_file.unlink(missing_ok=True)
        title = f"Feature {feature} · layer {source.layer} · {source.run_id} (SAEDashboard)"
        work.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"</head><body>\n{_header(source, feature, len(texts), n_tokens)}{page}\n</body></html>\n")
    return Rendered(Path(out), len(texts), n_tokens, time.perf_counter() - started, Path(out).stat().st_size)


def saedashboard_task(params: dict, ctx) -> dict:
    """The job behind the feature page's button: the page, under the run's folder."""
    layer, feature = int(params["layer"]), int(params["feature"])
    source = open_layer(ctx.settings, params["run_id"], layer)
    try:
        require_sae(source)
        run = ctx.cache.get(params["run_id"])
        ctx.report(0.05, "loading the SAE")
        sae = _fresh_sae(run, layer)
        out = dashboard_path(source.run_dir, layer, feature)
        out.parent.mkdir(parents=True, exist_ok=True)
        done = render(source, run.adapter, sae, feature, out, int(params.get("n_texts") or DEFAULT_TEXTS),
                      lambda share: ctx.report(0.1 + 0.85 * share, "reading the feature on the corpus"))
    except ExportError as exc:
        raise JobFailed(str(exc)) from None
    ctx.report(1.0, "done")
    return {"layer": layer, "feature": feature, "n_texts": done.n_texts, "n_tokens": done.n_tokens,
            "bytes": done.bytes, "seconds": round(done.seconds, 2),
            "url": f"/runs/{quote(params['run_id'], safe='')}/layers/{layer}/features/{feature}/saedashboard.html"}


def _fresh_sae(run, layer: int):
    """The layer's SAE loaded anew: the runner edits the module it is given (its fold, which is
    turned off, and its hooks), and the cached one serves ablations."""
    return load_sae(run.run_dir / store.layer_info(run.store_path, layer)["sae_path"], run.adapter.device)
