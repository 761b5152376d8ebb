"""The batched sampler: greedy, filters, seeded reproducibility independent of the batch, logprobs."""

from __future__ import annotations

import numpy as np
import torch

from workers.sampler import _filter_top_k_top_p, sample, uniform_noise
from workers.step import SamplingBatch


def batch(temperature, top_p=None, top_k=None, seeds=None, steps=None, num_logprobs=-1) -> SamplingBatch:
    n = len(temperature)
    return SamplingBatch(
        temperature=np.asarray(temperature, dtype=np.float32),
        top_p=np.asarray(top_p or [1.0] * n, dtype=np.float32),
        top_k=np.asarray(top_k or [0] * n, dtype=np.int64),
        noise_seed=np.asarray(seeds or list(range(n)), dtype=np.int64),
        noise_step=np.asarray(steps or [0] * n, dtype=np.int64),
        num_logprobs=num_logprobs,
    )


def test_greedy_is_argmax_with_logprobs():
    logits = torch.randn(3, 50)
    out = sample(logits, batch([0, 0, 0], num_logprobs=2))
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1)
    assert np.allclose(out.logprobs, expected.max(-1).values.numpy(), atol=1e-6)
    assert out.top_token_ids[:, 0].tolist() == out.token_ids.tolist()


def test_seeded_sampling_does_not_depend_on_batch_neighbours():
    torch.manual_seed(0)
    logits = torch.randn(4, 200)
    alone = sample(logits[2:3], batch([1.0], seeds=[1234], steps=[5]))
    together = sample(logits, batch([0.5, 1.0, 1.0, 0.0], seeds=[1, 2, 1234, 4], steps=[0, 0, 5, 0]))
    assert together.token_ids[2] == alone.token_ids[0]
    other_step = sample(logits[2:3], batch([1.0], seeds=[1234], steps=[6]))
    other_seed = [sample(logits[2:3], batch([1.0], seeds=[s], steps=[5])).token_ids[0] for s in range(20)]
    assert len(set(other_seed)) > 1 and other_step.token_ids.shape == (1,)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().expand(4000, 3)
    out = sample(logits, batch([1.0] * 4000, seeds=list(range(4000))))
    freq = np.bincount(out.token_ids, minlength=3) / 4000
    assert np.allclose(freq, probs.numpy(), atol=0.03)


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    kept = _filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 0.9])).isfinite()
    assert kept.sum(-1).tolist() == [2, 1, 3]
    out = sample(logits, batch([1.0] * 3, top_k=[1, 0, 0], top_p=[1.0, 0.01, 1.0]))
    assert out.token_ids[:2].tolist() == [0, 0]


def test_uniform_noise_range_and_determinism():
    seeds, steps = torch.tensor([7, 2**40 + 3]), torch.tensor([0, 9])
    u = uniform_noise(seeds, steps, 10000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, uniform_noise(seeds, steps, 10000))
