"""Rotary position embedding over flat tokens, from a cos/sin table precomputed per position.

Uses the half-split ("rotate_half") pairing of HF Llama checkpoints: dimension i rotates with
dimension i + head_dim/2. The table is built in float32 and cast to the activations' dtype when
applied, which is what transformers does, so results match it in every dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.models.config import SUPPORTED_ROPE_TYPES, RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair rotation speeds [head_dim/2], with the rope type's scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.rope_type == "default":
        return inv_freq
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    raise ValueError(f"rope type {rope.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1 scaling: slow frequencies are divided by `factor`, fast ones are kept, and the
    band between is interpolated linearly in (original context / wavelength)."""
    context = rope.original_max_position_embeddings
    if context is None:
        raise ValueError("llama3 rope scaling needs original_max_position_embeddings")
    wavelength = 2 * math.pi / inv_freq
    blend = (context / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
    slow = wavelength > context / rope.low_freq_factor
    fast = wavelength < context / rope.high_freq_factor
    return torch.where(slow, inv_freq / rope.factor, torch.where(fast, inv_freq, blended))


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        angles = torch.arange(max_position, dtype=torch.float32)[:, None] * inverse_frequencies(head_dim, rope)
        self.register_buffer("cos", angles.cos(), persistent=False)  # [max_position, head_dim/2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T], q [T, H*D], k [T, Hkv*D] -> rotated q, k of the same shapes."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)  # [T, 1, D/2], broadcast over heads
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        first, second = x.view(tokens, -1, self.head_dim).chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.view(tokens, -1)
