"""Paged attention: write this step's K/V into the block-paged cache, attend over block tables.

The torch path pads the step into a batch and runs one masked scaled-dot-product attention for
all sequences: a prefill (every sequence starts at position 0, nothing is cached before it)
attends over its own new keys; any other step (decodes, prefill chunks after earlier chunks,
or both mixed) gathers each sequence's cache blocks, whole blocks at a time, and masks by
position. On a CPU worker those steps instead run the C++ paged kernel of
`workers.cpu_attention`, which reads the blocks in place: one query row per token, each with
its sequence's block table and its own position as the causal limit. No per-sequence or per-token Python loop; the index tensors are built once
per step (`AttentionMetadata.build`) and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from workers import cpu_attention


@dataclass
class PaddedQueries:
    """Sequences' queries as a padded [B, Q] batch, which only the torch path attends over."""

    query_index: torch.Tensor  # [B, Q] flat token index of each sequence's queries (padded)
    query_valid: torch.Tensor  # [B, Q] False on padding
    attn_mask: torch.Tensor  # [B, 1, Q, L] True where the query may attend the key

    @staticmethod
    def build(positions: torch.Tensor, query_lens: torch.Tensor, key_len: int) -> PaddedQueries:
        """From the flat positions [T] of sequences with `query_lens` [B] tokens each, in order."""
        device = positions.device
        max_query = int(query_lens.max())
        query_starts = torch.cumsum(query_lens, 0) - query_lens
        steps = torch.arange(max_query, device=device)
        query_valid = steps[None, :] < query_lens[:, None]
        query_index = torch.where(query_valid, query_starts[:, None] + steps[None, :], 0)
        query_pos = torch.where(query_valid, positions[query_index], 0)
        key_pos = torch.arange(key_len, device=device)
        attn_mask = (key_pos[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
        return PaddedQueries(query_index, query_valid, attn_mask)


@dataclass
class CachedQueryGroup:
    """Sequences the torch path attends over the cache together. A step that mixes decodes with
    prefill chunks makes two groups, so a long chunk does not pad every decode's queries (and
    mask) to its length."""

    token_index: torch.Tensor | None  # [Tg] the group's tokens in the step; None = every token
    blocks: torch.Tensor  # [Bg, M] cache blocks of the group's sequences
    padded: PaddedQueries


@dataclass
class AttentionMetadata:
    """Per-step index tensors, identical for every layer of the model."""

    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    gather_blocks: torch.Tensor  # [B, M] cache blocks holding each sequence's positions 0..M*block_size-1
    context_lens: torch.Tensor  # [B] int64 tokens each sequence attends to
    positions: torch.Tensor  # [T]
    query_lens: torch.Tensor  # [B]
    block_size: int
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
        num_blocks = -(-int(context_lens.max()) // block_size)
        return AttentionMetadata(
            slot_mapping, block_tables[:, :num_blocks], context_lens, positions, query_lens, block_size, is_prefill
        )

    @cached_property
    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token as its own kernel row: its sequence's block table [T, M] and the keys it may
        see [T] (positions up to its own). A decode-only step is already one token per row."""
        if self.positions.shape[0] == self.query_lens.shape[0]:
            return self.gather_blocks, self.context_lens
        rows = torch.repeat_interleave(torch.arange(self.query_lens.shape[0], device=self.positions.device),
                                       self.query_lens)
        return self.gather_blocks[rows], self.positions + 1

    @cached_property
    def padded(self) -> PaddedQueries:
        """A prefill's queries over its own new keys; built on first use, once per step."""
        return PaddedQueries.build(self.positions, self.query_lens, int(self.query_lens.max()))

    @cached_property
    def cached_groups(self) -> list[CachedQueryGroup]:
        """The torch path's groups for a step that attends over the cache (built once per step)."""
        single = self.query_lens == 1
        if bool(single.all()) or not bool(single.any()):
            key_len = self.gather_blocks.shape[1] * self.block_size
            return [CachedQueryGroup(None, self.gather_blocks, PaddedQueries.build(self.positions, self.query_lens, key_len))]
        seq_of_token = torch.repeat_interleave(torch.arange(len(single), device=single.device), self.query_lens)
        groups = []
        for chosen in (single, ~single):
            seqs = chosen.nonzero()[:, 0]
            token_index = chosen[seq_of_token].nonzero()[:, 0]
            num_blocks = -(-int(self.context_lens[seqs].max()) // self.block_size)
            padded = PaddedQueries.build(self.positions[token_index], self.query_lens[seqs], num_blocks * self.block_size)
            groups.append(CachedQueryGroup(token_index, self.gather_blocks[seqs, :num_blocks], padded))
        return groups


class Attention(nn.Module):
    """Attention over this rank's heads and its shard of the block-paged KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.block_size = 0
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zeroed, so cache rows no sequence wrote can never feed NaNs into attention."""
        shape = (num_blocks * block_size, self.num_kv_heads, self.head_dim)
        self.block_size = block_size
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] -> [T, H*D]."""
        tokens = q.shape[0]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        self.k_cache[meta.slot_mapping] = k
        self.v_cache[meta.slot_mapping] = v
        if not meta.is_prefill and q.device.type == "cpu" and cpu_attention.kernel() is not None:
            block_tables, context_lens = meta.per_token
            out = cpu_attention.paged_decode_attention(
                q.view(tokens, self.num_heads, self.head_dim), self.k_cache, self.v_cache,
                block_tables, context_lens, self.block_size, self.scale,
            )
            return out.view(tokens, self.num_heads * self.head_dim)
        queries = q.view(tokens, self.num_heads, self.head_dim)
        if meta.is_prefill:  # every key of the sequence is new in this step
            padded = meta.padded
            return self._attend(queries, k[padded.query_index], v[padded.query_index], padded)
        out = None
        for group in meta.cached_groups:
            keys, values = self._gather(self.k_cache, group.blocks), self._gather(self.v_cache, group.blocks)
            if group.token_index is None:
                return self._attend(queries, keys, values, group.padded)
            if out is None:
                out = q.new_empty(tokens, self.num_heads * self.head_dim)
            out[group.token_index] = self._attend(queries[group.token_index], keys, values, group.padded)
        return out

    def _attend(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padded: PaddedQueries
    ) -> torch.Tensor:
        """queries [Tg, H, D] attend keys/values [B, L, Hkv, D] under the padded mask -> [Tg, H*D]."""
        out = F.scaled_dot_product_attention(
            queries[padded.query_index].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=padded.attn_mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, H, Q, D]
        return out.transpose(1, 2)[padded.query_valid].reshape(queries.shape[0], self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """[B, M*block_size, Hkv, D]: each sequence's blocks, copied whole."""
        return cache.view(-1, self.block_size, self.num_kv_heads, self.head_dim)[blocks].flatten(1, 2)
