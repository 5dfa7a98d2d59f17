"""The one interface every reward-model family implements.

An adapter tokenises texts, runs the model with forward hooks on many layers in one pass,
and says where rewards are read. Layers are 0-based transformer blocks; a hook on layer L
sees (and may replace) the residual stream after block L, i.e. HF hidden_states[L + 1].

A batch has one or more *reward reads* per text: one for a sequence classifier, one per
reasoning step for a process RM. Each read has a score, a token it is read at, and a
segment: the tokens it covers (the whole text, or the step's own tokens), which is what
token pooling (sum / mean / max) pools over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

# A layer edit receives the block's hidden states [batch, seq, d] and returns new ones.
LayerEdit = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised from a hook once the deepest needed layer ran: later layers are skipped."""


class _StandIn(nn.Module):
    """Takes a block's place for one forward: passes its input through, or returns `output`
    (the block's output computed earlier), shaped as the block returns it."""

    def __init__(self, output: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.output, self.as_tuple = output, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.output is None else self.output
        return (out,) if self.as_tuple else out


@dataclass
class Batch:
    texts: list[str]
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    reward_index: torch.Tensor  # [R, 2] (sequence in batch, token position) of each reward read
    token_segment: torch.Tensor  # [B, T] the reward read each token belongs to; -1 for none
    rewards: np.ndarray | None = None  # the dataset's own reward per text, when it has one
    # [B, T] the tokens analysis reads (analysis.tokens: response, workers/chat.py); None: every token
    scope: torch.Tensor | None = None

    @property
    def n_reads(self) -> int:
        return len(self.reward_index)

    def analysed_tokens(self) -> torch.Tensor:
        """[B, T] bool: the real tokens analysis reads (a chat run's response), so the tokens its
        SAEs are trained on, judged on and spliced in at."""
        real = self.attention_mask.bool()
        return real if self.scope is None else real & self.scope.bool()

    def reads_of(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """For each sequence in `rows`, the ids of its reward reads, in order."""
        seq = self.reward_index[:, 0]
        return [torch.nonzero(seq == r).squeeze(1) for r in rows.tolist()]

    def select(self, rows: torch.Tensor) -> "Batch":
        """The batch of sequences `rows` (in that order, repeats allowed), its reward reads
        renumbered in the order of reads_of(rows): many edits of the same texts then run as
        one forward."""
        rows = rows.to(self.input_ids.device)
        old_reads = self.reads_of(rows)
        device = self.reward_index.device
        new_id = torch.full((len(rows), max(self.n_reads, 1)), -1, dtype=torch.long, device=device)
        index, start = [], 0
        for i, reads in enumerate(old_reads):
            new_id[i, reads] = torch.arange(start, start + len(reads), device=device)
            index.append(torch.stack([torch.full_like(reads, i), self.reward_index[reads, 1]], 1))
            start += len(reads)
        segment = self.token_segment[rows]
        segment = torch.where(segment >= 0, new_id.gather(1, segment.clamp(min=0)), segment)
        return Batch([self.texts[r] for r in rows.tolist()], self.input_ids[rows], self.attention_mask[rows],
                     torch.cat(index), segment, None if self.rewards is None else self.rewards[rows.cpu().numpy()],
                     None if self.scope is None else self.scope[rows])


def whole_text_segments(attention_mask: torch.Tensor) -> torch.Tensor:
    """One reward read per sequence, covering all of its tokens."""
    rows = torch.arange(len(attention_mask), device=attention_mask.device).unsqueeze(1)
    return torch.where(attention_mask.bool(), rows, torch.full_like(attention_mask, -1))


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's last non-pad position, whichever side it is padded on."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


def response_tokens(enc, texts: list[str], markers) -> torch.Tensor:
    """[B, T] the tokens inside each text's response (markers.response_span); a text without
    one (a plain text typed on a chat run's page) keeps every token."""
    offsets, real = enc["offset_mapping"], enc["attention_mask"].bool()
    inside = torch.zeros_like(real)
    for row, text in enumerate(texts):
        span = markers.response_span(text)
        if span is None:
            inside[row] = real[row]
            continue
        starts, ends = offsets[row, :, 0], offsets[row, :, 1]
        inside[row] = real[row] & (ends > starts) & (starts >= span[0]) & (starts < span[1])
    return inside


def find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The transformer blocks, found structurally so any HF architecture works."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find a ModuleList of {n_layers} transformer blocks in the model")


class RewardModelAdapter:
    kind: str = ""
    # False where the score is a function of the text (causal LM + reward function): layer
    # edits then change the activations but not the score.
    score_from_model: bool = True
    needs_offsets: bool = False  # ask the tokenizer for character offsets (reward_reads gets them)
    # chat runs reading only the response (workers/chat.py ChatMarkers): Batch.scope marks its tokens
    response_markers = None

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, max_length: int):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length
        self.n_layers: int = model.config.num_hidden_layers
        self.d_model: int = model.config.hidden_size
        self.blocks = find_blocks(model, self.n_layers)
        self._blocks_return_tuple: bool | None = None  # learnt from the first hooked forward

    # -- to be implemented by each family ---------------------------------------------
    def reward_reads(self, enc, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward_index [R, 2], token_segment [B, T]) for a tokenised batch (`enc`, on the CPU)."""
        raise NotImplementedError

    def score(self, batch: Batch) -> torch.Tensor:
        """Run the full model and return one reward per reward read [R]."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------
    def tokenize(self, texts: list[str], rewards: np.ndarray | None = None) -> Batch:
        texts = list(texts)
        offsets = self.needs_offsets or self.response_markers is not None
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
            **({"return_offsets_mapping": True} if offsets else {}),
        )
        index, segment = self.reward_reads(enc, texts)
        to = lambda t: t.to(self.device)  # noqa: E731
        scope = None if self.response_markers is None else to(response_tokens(enc, texts, self.response_markers))
        return Batch(texts, to(enc["input_ids"]), to(enc["attention_mask"]), to(index), to(segment), rewards=rewards,
                     scope=scope)

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @torch.no_grad()
    def run(
        self,
        batch: Batch,
        capture: list[int] = (),
        edits: dict[int, LayerEdit] | None = None,
        need_score: bool = True,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """One forward pass: capture the residual stream at `capture` layers (after any
        edit there) and apply `edits`. Without need_score, stops after the deepest layer."""
        edits = edits or {}
        captured: dict[int, torch.Tensor] = {}
        last_needed = max([*capture, *edits], default=-1)

        def make_hook(layer: int):
            def hook(module, args, output):
                self._blocks_return_tuple = isinstance(output, tuple)
                hidden = output[0] if isinstance(output, tuple) else output
                if layer in edits:
                    hidden = edits[layer](hidden)
                if layer in capture:
                    captured[layer] = hidden.detach()
                if not need_score and layer == last_needed:
                    raise StopForward
                if layer in edits:
                    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
                return None

            return hook

        layers = sorted(set(capture) | set(edits))
        handles = [self.blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
        scores = None
        try:
            scores = self.score(batch)
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return scores, captured

    @torch.no_grad()
    def run_from(self, batch: Batch, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """scores_from without gradients: what ablations run again and again."""
        return self.scores_from(batch, layer, hidden)

    def scores_from(self, batch: Batch, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The scores of `batch` when block `layer` outputs `hidden` [B, T, d]: only the blocks
        above it run. With `hidden` captured by `run` this is `run`'s score; with it edited, the
        score under that edit -- what an ablation over the same texts needs again and again.
        Blocks up to `layer` are swapped for stand-ins for this one forward; the model's own
        forward still builds the masks and position encodings the later blocks take. With grad
        enabled it is differentiable in `hidden` (workers/text_attribution.py)."""
        if self._blocks_return_tuple is None:
            self.run(batch, capture=[0], need_score=False)
        originals = [self.blocks[i] for i in range(layer + 1)]
        try:
            for i in range(layer):
                self.blocks[i] = _StandIn(None, self._blocks_return_tuple)
            self.blocks[layer] = _StandIn(hidden, self._blocks_return_tuple)
            return self.score(batch)
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block

    def batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[int, Batch]]:
        for start in range(0, len(texts), batch_size):
            yield start, self.tokenize(texts[start : start + batch_size])
