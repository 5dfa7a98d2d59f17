"""Each feature's nearest features on the same layer, by cosine similarity of decoder rows."""
from __future__ import annotations

import numpy as np
import torch

N_NEIGHBOURS = 10


@torch.no_grad()
def decoder_neighbours(w_dec: torch.Tensor, k: int = N_NEIGHBOURS, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines), each [d_sae, k], nearest first, never the feature itself.

    Chunked so a 32k-feature SAE needs [chunk, d_sae] of memory, not d_sae²."""
    unit = torch.nn.functional.normalize(w_dec.float(), dim=1)
    d_sae = unit.shape[0]
    k = min(k, d_sae - 1)
    indices = np.empty((d_sae, k), dtype=np.int32)
    cosines = np.empty((d_sae, k), dtype=np.float32)
    for start in range(0, d_sae, chunk):
        sims = unit[start:start + chunk] @ unit.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        sims[rows, rows + start] = -2.0  # below any cosine: a feature is not its own neighbour
        top = sims.topk(k, dim=1)
        indices[start:start + chunk] = top.indices.cpu().numpy()
        cosines[start:start + chunk] = top.values.cpu().numpy()
    return indices, cosines
