"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Random choices use the exponential race (argmax of p / E with E ~ Exp(1)), where each row's
noise comes from a counter-based hash of (request seed, token index, vocabulary index). So a
seeded request samples the same tokens whatever batch it shares, and no row needs its own
generator or Python loop.
"""

from __future__ import annotations

import torch

from workers.step import SamplingBatch, StepOutput

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # small odd multiplier: products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] floats in (0, 1), a pure function of each row's (seed, step) and the column."""
    row = _mix32((seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _mix32(steps & _MASK32)))
    columns = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32(row[:, None] ^ _mix32(columns)[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits outside each row's top-k and top-p nucleus (one sort for the batch)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]  # the top token is always kept
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: SamplingBatch) -> StepOutput:
    """Pick one token per row of `logits` [B, V]."""
    logits = logits.float()
    device = logits.device
    temperature = torch.as_tensor(params.temperature, device=device)
    greedy_tokens = logits.argmax(dim=-1)
    tokens = greedy_tokens
    if bool((temperature > 0).any()):
        scaled = logits / temperature.clamp_min(1e-5)[:, None]
        top_k = torch.as_tensor(params.top_k, device=device)
        top_p = torch.as_tensor(params.top_p, device=device)
        if bool((top_k > 0).any()) or bool((top_p < 1).any()):
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = uniform_noise(
            torch.as_tensor(params.noise_seed, device=device),
            torch.as_tensor(params.noise_step, device=device),
            logits.shape[-1],
        )
        sampled = (probs / -torch.log(noise)).argmax(dim=-1)
        tokens = torch.where(temperature > 0, sampled, greedy_tokens)
    output = StepOutput(token_ids=tokens.cpu().numpy())
    if params.num_logprobs >= 0:
        logprobs = logits.log_softmax(dim=-1)
        output.logprobs = logprobs.gather(-1, tokens[:, None])[:, 0].cpu().numpy()
        if params.num_logprobs > 0:
            top = logprobs.topk(params.num_logprobs, dim=-1)
            output.top_token_ids = top.indices.cpu().numpy()
            output.top_logprobs = top.values.cpu().numpy()
    return output
