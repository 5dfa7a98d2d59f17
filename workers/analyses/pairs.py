"""Paired dictionaries (Marks et al., "Beyond Training Objectives", eq. 2): with sae.widths, each
layer has its run SAE (the larger width) and a paired SAE of the smaller width, trained from the
same activation batches (workers/train.py). Their Mean Max Cosine Similarity,

    MMCS(A, B) = mean over A's decoder directions a of max over B's directions b of cos(a, b),

is computed both ways per layer, and per feature of the run SAE its max cosine in the paired
dictionary and which paired feature that is: a feature whose max cosine is high is "present in
both" dictionaries, one the dictionary size did not decide.

Without sae.widths the columns are NULL."""
from __future__ import annotations

import time

import torch

from workers.sae_ops import decoder_directions
from workers.stages import RunContext, Stage, StageOutput
from workers.train import load_saes, pair_dir

LAYER_COLUMNS = ("pair_width", "pair_sae_path", "mmcs_to_pair", "mmcs_from_pair")
FEATURE_COLUMNS = ("pair_max_cosine", "pair_feature")
CHUNK_ELEMENTS = 1 << 24  # cosines held at once: 64 MB of float32 (a 32k x 16k pair: ~2,000 rows a chunk)


def unit_rows(directions: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; a zero row stays zero (its cosine with anything is 0)."""
    directions = directions.float()
    return directions / directions.norm(dim=1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def max_cosines(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both ways at once, for decoder directions a [n_a, d] and b [n_b, d] (any lengths):
    (max cosine of each a row over b's rows, the b row reaching it, the same for each b row over
    a's, the a row reaching it). `chunk` a rows at a time (default: CHUNK_ELEMENTS cosines)."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"decoder directions of {a.shape[1]} and {b.shape[1]} dimensions cannot be compared")
    a, b = unit_rows(a), unit_rows(b)
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(1, b.shape[0]))
    a_max, a_arg = [], []
    b_max = torch.full((b.shape[0],), -float("inf"), device=b.device)
    b_arg = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
    for start in range(0, a.shape[0], chunk):
        cos = a[start:start + chunk] @ b.T
        values, index = cos.max(dim=1)
        a_max.append(values)
        a_arg.append(index)
        column, row = cos.max(dim=0)
        better = column > b_max  # ties keep the earlier a row, as one unchunked max would
        b_max = torch.where(better, column, b_max)
        b_arg = torch.where(better, row + start, b_arg)
    return torch.cat(a_max), torch.cat(a_arg), b_max, b_arg


def mmcs(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> tuple[float, float]:
    """(MMCS(a -> b), MMCS(b -> a)) of two sets of decoder directions."""
    a_max, _, b_max, _ = max_cosines(a, b, chunk)
    return float(a_max.mean()), float(b_max.mean())


def run(ctx: RunContext) -> StageOutput:
    layers = list(ctx.config.layers)
    width = ctx.config.sae.pair_width
    if width is None:
        return StageOutput(layer_columns={layer: dict.fromkeys(LAYER_COLUMNS) for layer in layers},
                              feature_columns={layer: dict.fromkeys(FEATURE_COLUMNS) for layer in layers})
    out = StageOutput()
    for i, layer in enumerate(layers):
        started = time.time()
        path = pair_dir(ctx.run_dir, layer, width)
        pair = load_saes({layer: path}, ctx.device)[layer]
        if pair.cfg.d_sae != width:
            raise ValueError(f"the paired SAE at {path} has {pair.cfg.d_sae} features, sae.widths says {width}")
        main_dirs, pair_dirs = decoder_directions(ctx.saes[layer]), decoder_directions(pair)
        main_max, main_arg, pair_max, _ = max_cosines(main_dirs, pair_dirs)
        to_pair, from_pair = float(main_max.mean()), float(pair_max.mean())
        out.layer_columns[layer] = {"pair_width": width, "pair_sae_path": str(path.relative_to(ctx.run_dir)),
                                    "mmcs_to_pair": to_pair, "mmcs_from_pair": from_pair}
        out.feature_columns[layer] = {"pair_max_cosine": main_max.cpu().double().tolist(),
                                      "pair_feature": main_arg.cpu().tolist()}
        shared = float((main_max >= 0.9).float().mean())
        ctx.stage(f"layer {layer}: MMCS with the {width}-wide pair {to_pair:.3f} (its {main_dirs.shape[0]} features "
                  f"-> pair), {from_pair:.3f} (pair -> them); {shared:.1%} have max cosine >= 0.9 "
                  f"({time.time() - started:.1f} s)")
        ctx.progress((i + 1) / len(layers))
    return out


STAGE = Stage("pairs", run, sections=("mmcs",), layer_columns=LAYER_COLUMNS, feature_columns=FEATURE_COLUMNS)
