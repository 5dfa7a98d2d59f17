"""SAE helpers that analysis, ablation and the causal stages share: decoder directions,
pooling features per reward read, and feature edits spliced in with the reconstruction
error kept (the layer's output h becomes h + decode(f') - decode(f), so with nothing changed
it is h itself and every difference comes from the chosen features alone)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.sinks import sink_rule_of

MODES = ("zero", "clamp", "steer")
# Where an edit applies: the text's own tokens (special tokens such as [CLS], [SEP] or BOS left as
# they are, as token pooling and attribution read them), or every real token. At an encoder's
# late layers [CLS] already holds the score: editing it answers "what if the summary changed",
# not which features of the text drive the reward.
SCOPES = ("text", "all")


@torch.no_grad()
def decoder_directions(sae, chunk: int = 512) -> torch.Tensor:
    """[d_sae, d_in]: how the SAE's reconstruction moves per unit of each feature (the decoder
    rows, including any decoder-norm rescaling the SAE applies)."""
    d_sae, ref = sae.cfg.d_sae, sae.W_dec
    base = sae.decode(torch.zeros(1, d_sae, device=ref.device, dtype=ref.dtype))
    rows = []
    for start in range(0, d_sae, chunk):
        n = min(chunk, d_sae - start)
        unit = torch.zeros(n, d_sae, device=ref.device, dtype=ref.dtype)
        unit[torch.arange(n), torch.arange(start, start + n)] = 1.0
        rows.append(sae.decode(unit) - base)
    return torch.cat(rows).float()


@torch.no_grad()
def linear_decoder(sae, rows: torch.Tensor | None = None) -> torch.Tensor | None:
    """The decoder's rows (`rows`: decoder_directions, when the caller has them) when
    decode(f) = decode(0) + f @ rows (any SAE without a run-time output normalisation),
    checked on random sparse codes; None when it is not."""
    rows = decoder_directions(sae) if rows is None else rows
    ref = sae.W_dec
    generator = torch.Generator().manual_seed(0)
    codes = torch.rand(8, sae.cfg.d_sae, generator=generator) * (torch.rand(8, sae.cfg.d_sae, generator=generator) < 0.05)
    codes = (codes * 4).to(device=ref.device, dtype=ref.dtype)
    base = sae.decode(torch.zeros_like(codes[:1]))
    expected = sae.decode(codes) - base
    error = (expected - codes @ rows).abs().max()
    return rows if float(error) <= 1e-4 * max(float(expected.abs().max()), 1.0) else None


def edited_tokens(batch, special_ids: torch.Tensor, scope: str = "text") -> torch.Tensor:
    """[B, T] where an edit of `scope` (SCOPES) applies."""
    if scope not in SCOPES:
        raise ValueError(f"tokens must be one of {', '.join(SCOPES)}, not {scope!r}")
    return batch.attention_mask.bool() if scope == "all" else content_tokens(batch, special_ids)


def content_tokens(batch, special_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] the text's own tokens: real, not special, and inside the batch's scope (a chat run's
    response, with analysis.tokens: response)."""
    content = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special_ids.to(batch.input_ids.device))
    return content if batch.scope is None else content & batch.scope.bool()


def pool_reads(acts, segment, content, read_rows, n_reads: int, how: str) -> torch.Tensor:
    """One feature row per reward read. Token pooling skips special tokens: at late layers a
    classifier's [CLS] already holds the score, which would hide the per-word features."""
    if how == "reward_token":
        return acts[read_rows]
    use = content & (segment >= 0)
    acts, segment = acts[use], segment[use]
    pooled = torch.zeros(n_reads, acts.shape[1], dtype=acts.dtype, device=acts.device)
    if how == "max":
        return pooled.index_reduce_(0, segment, acts, "amax", include_self=True)
    pooled.index_add_(0, segment, acts)
    if how == "sum":
        return pooled
    return pooled / torch.bincount(segment, minlength=n_reads).clamp(min=1).unsqueeze(1)


@dataclass(frozen=True)
class FeatureEdit:
    features: tuple[int, ...]
    mode: str  # one of MODES
    value: float = 0.0  # clamp: the activation; steer: the multiple of the decoder direction

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not self.features:
            raise ValueError("no features to change")


@torch.no_grad()
def edit_hidden(sae, hidden: torch.Tensor, edit: FeatureEdit, directions: torch.Tensor | None = None,
                linear: bool = False, before: torch.Tensor | None = None):
    """(new hidden, features before, features after) for hidden states [..., d_in].

    `directions`: the decoder rows (decoder_directions); with `linear` (see linear_decoder),
    zero and clamp apply the change as (after - before) x the chosen rows, instead of decoding
    every feature twice. `before`: sae.encode(hidden), when the caller kept it."""
    h = hidden.float()
    before = sae.encode(h) if before is None else before
    index = torch.tensor(edit.features, device=h.device)
    if edit.mode == "steer":
        if directions is None:
            directions = decoder_directions(sae)
        new = h + edit.value * directions[index].sum(0)
        after = sae.encode(new)
    else:
        after = before.clone()
        after[..., index] = 0.0 if edit.mode == "zero" else float(edit.value)
        if linear and directions is not None:
            new = h + (after[..., index] - before[..., index]) @ directions[index]
        else:
            new = h + (sae.decode(after) - sae.decode(before))
    return _sinks_untouched(sae, h, new).to(hidden.dtype), before, after


def _sinks_untouched(sae, h: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new` where the SAE reads, `h` at its layer's sinks (workers/sinks.py): no edit reaches them."""
    rule = sink_rule_of(sae)
    return new if rule.max_norm is None else torch.where(rule.kept(h).unsqueeze(-1), new, h)


@torch.no_grad()
def edit_chosen(sae, hidden: torch.Tensor, edit: FeatureEdit, directions: torch.Tensor | None = None,
                linear: bool = False, before: torch.Tensor | None = None):
    """As edit_hidden, but the features before and after only as far as the edit changes them:
    the chosen columns for zero and clamp (all columns for steer, which moves every feature).
    With a linear decoder this never copies or decodes the full feature matrix."""
    if edit.mode == "steer" or not (linear and directions is not None):
        new, f_before, f_after = edit_hidden(sae, hidden, edit, directions, linear, before)
        if edit.mode == "steer":
            return new, f_before, f_after
        index = torch.tensor(edit.features, device=hidden.device)
        return new, f_before[..., index], f_after[..., index]
    h = hidden.float()
    index = torch.tensor(edit.features, device=h.device)
    before_chosen = (sae.encode(h) if before is None else before)[..., index]
    after_chosen = torch.zeros_like(before_chosen) if edit.mode == "zero" else torch.full_like(before_chosen, edit.value)
    new = h + (after_chosen - before_chosen) @ directions[index]
    return _sinks_untouched(sae, h, new).to(hidden.dtype), before_chosen, after_chosen
