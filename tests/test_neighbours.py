"""Nearest features by decoder cosine, chunked, against a brute-force answer."""
import numpy as np
import torch

from workers.neighbours import decoder_neighbours


def test_chunked_neighbours_match_brute_force_and_skip_self():
    torch.manual_seed(0)
    w_dec = torch.randn(50, 8)
    w_dec[7] = 3 * w_dec[3] + 0.01 * torch.randn(8)  # 3 and 7 point the same way: each other's nearest
    indices, cosines = decoder_neighbours(w_dec, k=5, chunk=16)  # chunks of 16 do not divide 50
    unit = w_dec / w_dec.norm(dim=1, keepdim=True)
    sims = (unit @ unit.T).numpy()
    np.fill_diagonal(sims, -np.inf)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert indices.shape == (50, 5) and (indices == expected).all()
    assert np.allclose(cosines, np.take_along_axis(sims, expected, axis=1), atol=1e-6)
    assert indices[3, 0] == 7 and indices[7, 0] == 3 and cosines[3, 0] > 0.99
    assert not (indices == np.arange(50)[:, None]).any()


def test_fewer_features_than_k():
    indices, cosines = decoder_neighbours(torch.randn(4, 3), k=10)
    assert indices.shape == (4, 3) and cosines.shape == (4, 3)
