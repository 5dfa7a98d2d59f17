"""The shuffle buffer between the shared forward pass and the SAE trainers."""
import pytest
import torch

from workers.collect import shuffled_batches


def token_stream(n_chunks: int, chunk: int):
    """Chunks whose rows are token ids; hook 'b' holds the same tokens as 'a', doubled."""
    for i in range(n_chunks):
        ids = torch.arange(i * chunk, (i + 1) * chunk, dtype=torch.float32)[:, None].repeat(1, 3)
        yield {"a": ids, "b": 2 * ids}


def test_one_permutation_for_every_hook_and_no_token_served_twice():
    batches = list(shuffled_batches(token_stream(40, 37), buffer_tokens=256, batch_size=64))
    assert all(b["a"].shape == (64, 3) and b["b"].shape == (64, 3) for b in batches)
    assert all(torch.equal(b["b"], 2 * b["a"]) for b in batches)  # same tokens at both hooks
    served = torch.cat([b["a"][:, 0] for b in batches])
    assert len(served.unique()) == len(served)  # never twice
    assert len(served) > 40 * 37 - 64 - 256  # everything but a last partial batch and the mix
    assert not torch.equal(served, served.sort().values)  # shuffled


def test_batches_are_contiguous_for_the_sae_matmuls():
    batch = next(shuffled_batches(token_stream(10, 100), buffer_tokens=300, batch_size=50))
    assert batch["a"].is_contiguous() and batch["b"].is_contiguous()


def test_buffer_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="buffer_tokens"):
        next(shuffled_batches(token_stream(2, 10), buffer_tokens=32, batch_size=64))
