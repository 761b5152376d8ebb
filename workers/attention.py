"""Paged attention: write this step's K/V into the block-paged cache, attend over block tables.

The torch path gathers each sequence's cached keys into a padded batch and runs one masked
scaled-dot-product attention for the whole step, prefill and decode alike: no per-sequence
or per-token Python loop. The index tensors it needs are built once per step
(`AttentionMetadata.build`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Per-step index tensors, identical for every layer of the model."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    gather_slots: torch.Tensor  # [B, L] cache slot of each sequence's key positions 0..L-1
    query_index: torch.Tensor  # [B, Q] flat token index of each sequence's queries (padded)
    query_valid: torch.Tensor  # [B, Q] False on padding
    attn_mask: torch.Tensor  # [B, 1, Q, L] True where the query may attend the key
    is_prefill: bool

    @staticmethod
    def build(
        positions: torch.Tensor,
        query_lens: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        is_prefill: bool,
    ) -> AttentionMetadata:
        """From flat positions [T], per-sequence query/context lengths [B] and block tables [B, M]."""
        device = positions.device
        batch = query_lens.shape[0]
        max_query = int(query_lens.max())
        max_context = int(context_lens.max())
        offsets = torch.arange(block_size, device=device)
        slots = (block_tables[:, :, None] * block_size + offsets).reshape(batch, -1)
        gather_slots = slots[:, :max_context]
        query_starts = torch.cumsum(query_lens, 0) - query_lens
        steps = torch.arange(max_query, device=device)
        query_valid = steps[None, :] < query_lens[:, None]
        query_index = torch.where(query_valid, query_starts[:, None] + steps[None, :], 0)
        query_pos = torch.where(query_valid, positions[query_index], 0)
        key_pos = torch.arange(max_context, device=device)
        attn_mask = (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
        return AttentionMetadata(slot_mapping, gather_slots, query_index, query_valid, attn_mask, is_prefill)


class Attention(nn.Module):
    """Attention over this rank's heads; `k_cache`/`v_cache` are bound by the model runner."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        tokens = q.shape[0]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        self.k_cache[meta.slot_mapping] = k
        self.v_cache[meta.slot_mapping] = v
        keys = self.k_cache[meta.gather_slots].transpose(1, 2)  # [B, Hkv, L, D]
        values = self.v_cache[meta.gather_slots].transpose(1, 2)
        queries = q.view(tokens, self.num_heads, self.head_dim)[meta.query_index].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.attn_mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, Q, D]
        return out.transpose(1, 2)[meta.query_valid].reshape(tokens, self.num_heads * self.head_dim)
