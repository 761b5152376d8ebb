"""The C++ paged decode-attention kernel against the torch path it replaces on CPU workers.

Both run through `Attention.forward` on the same block-paged cache: the kernel reads blocks in
place, the torch path gathers them and runs scaled-dot-product attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers import cpu_attention
from workers.attention import Attention, AttentionMetadata
from workers.cpu_attention import EXTENSION
from workers.cpu_extension import DISABLE_ENV, CpuExtension

pytestmark = pytest.mark.skipif(cpu_attention.kernel() is None, reason="no C++ compiler for the CPU kernel")


def decode_step(
    layer: Attention, context_lens: list[int], block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Fill the cache with each sequence's history (blocks scattered over the cache) and build
    one decode step whose new token is the last of each context."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    table_width = max(blocks_needed) + 1  # a spare column, as the lookahead reservation leaves
    block_ids = rng.permutation(layer.k_cache.shape[0] // block_size)
    tables = np.zeros((len(context_lens), table_width), dtype=np.int64)
    used = 0
    for row, count in enumerate(blocks_needed):
        tables[row, :count] = block_ids[used : used + count]
        used += count
    kv_shape = (layer.k_cache.shape[0], layer.num_kv_heads, layer.head_dim)
    layer.k_cache.copy_(torch.randn(kv_shape, generator=gen).to(dtype))
    layer.v_cache.copy_(torch.randn(kv_shape, generator=gen).to(dtype))
    positions = torch.tensor(context_lens) - 1
    block_tables = torch.from_numpy(tables)
    rows = torch.arange(len(context_lens))
    slot_mapping = block_tables[rows, positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata.build(
        positions=positions, query_lens=torch.ones(len(context_lens), dtype=torch.int64),
        context_lens=torch.tensor(context_lens), block_tables=block_tables, slot_mapping=slot_mapping,
        block_size=block_size, is_prefill=False,
    )
    tokens = len(context_lens)
    q = torch.randn(tokens, layer.num_heads * layer.head_dim, generator=gen).to(dtype)
    k = torch.randn(tokens, layer.num_kv_heads * layer.head_dim, generator=gen).to(dtype)
    v = torch.randn(tokens, layer.num_kv_heads * layer.head_dim, generator=gen).to(dtype)
    return q, k, v, meta


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(4, 4, 16), (8, 2, 64), (6, 3, 20), (4, 1, 128)]
)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_matches_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype,
) -> None:
    context_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 37, 5]
    layer = Attention(num_heads, num_kv_heads, head_dim, scale=head_dim**-0.5)
    layer.allocate_cache(64, block_size, dtype, torch.device("cpu"))
    q, k, v, meta = decode_step(layer, context_lens, block_size, dtype, seed=head_dim + block_size)

    ours = layer(q, k, v, meta)
    monkeypatch.setattr(cpu_attention, "kernel", lambda: None)
    reference = layer(q, k, v, meta)

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), atol=tolerance, rtol=tolerance)


def test_scores_of_very_different_size_stay_finite() -> None:
    """The online softmax rescales across blocks; a huge score in a late block must not overflow."""
    layer = Attention(2, 1, 8, scale=1.0)
    layer.allocate_cache(8, 4, torch.float32, torch.device("cpu"))
    q, k, v, meta = decode_step(layer, [13], 4, torch.float32, seed=0)
    q = q * 50
    out = layer(q, k, v, meta)
    assert torch.isfinite(out).all()


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = CpuExtension(EXTENSION.name, EXTENSION.source, EXTENSION.functions)
    monkeypatch.setattr(cpu_attention, "EXTENSION", fresh)
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert cpu_attention.kernel() is None
    with pytest.raises(RuntimeError, match="not available"):
        cpu_attention.paged_decode_attention(*[torch.zeros(1)] * 5, block_size=1, scale=1.0)


def naive_cached_attention(layer: Attention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each token attends to its sequence's cached keys at positions up to its own, one at a time."""
    group = layer.num_heads // layer.num_kv_heads
    seq_of_token = torch.repeat_interleave(torch.arange(len(meta.query_lens)), meta.query_lens)
    out = torch.empty(q.shape[0], layer.num_heads, layer.head_dim)
    for token, (seq, position) in enumerate(zip(seq_of_token.tolist(), meta.positions.tolist())):
        keys_pos = torch.arange(position + 1)
        slots = meta.gather_blocks[seq, keys_pos // layer.block_size] * layer.block_size + keys_pos % layer.block_size
        keys = layer.k_cache[slots].float().repeat_interleave(group, dim=1)  # [L, H, D]
        values = layer.v_cache[slots].float().repeat_interleave(group, dim=1)
        query = q[token].view(layer.num_heads, layer.head_dim).float()
        weights = (torch.einsum("hd,lhd->hl", query, keys) * layer.scale).softmax(-1)
        out[token] = torch.einsum("hl,lhd->hd", weights, values)
    return out.reshape(q.shape[0], -1)


def mixed_step(layer: Attention, histories: list[int], query_lens: list[int], seed: int):
    """Sequences with `histories` tokens already cached computing `query_lens` new ones: decodes
    (1), prefill chunks after earlier chunks, and a fresh prompt (history 0), in one step."""
    gen = torch.Generator().manual_seed(seed)
    block_size = layer.block_size
    contexts = [h + n for h, n in zip(histories, query_lens)]
    width = max(-(-c // block_size) for c in contexts)
    block_ids = torch.randperm(layer.k_cache.shape[0] // block_size, generator=gen)
    tables = block_ids[: len(contexts) * width].view(len(contexts), width)
    kv_shape = layer.k_cache.shape
    layer.k_cache.copy_(torch.randn(kv_shape, generator=gen))
    layer.v_cache.copy_(torch.randn(kv_shape, generator=gen))
    positions = torch.cat([torch.arange(h, h + n) for h, n in zip(histories, query_lens)])
    rows = torch.repeat_interleave(torch.arange(len(contexts)), torch.tensor(query_lens))
    slot_mapping = tables[rows, positions // block_size] * block_size + positions % block_size
    meta = AttentionMetadata.build(
        positions=positions, query_lens=torch.tensor(query_lens), context_lens=torch.tensor(contexts),
        block_tables=tables, slot_mapping=slot_mapping, block_size=block_size, is_prefill=False,
    )
    tokens = len(positions)
    q = torch.randn(tokens, layer.num_heads * layer.head_dim, generator=gen)
    k = torch.randn(tokens, layer.num_kv_heads * layer.head_dim, generator=gen)
    v = torch.randn(tokens, layer.num_kv_heads * layer.head_dim, generator=gen)
    return q, k, v, meta


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch-groups"])
def test_mixed_decode_and_chunk_steps_match_naive_attention(monkeypatch: pytest.MonkeyPatch, use_kernel: bool) -> None:
    layer = Attention(8, 2, 16, scale=0.25)
    layer.allocate_cache(64, 4, torch.float32, torch.device("cpu"))
    q, k, v, meta = mixed_step(layer, histories=[9, 0, 5, 13, 2], query_lens=[1, 6, 7, 1, 3], seed=3)
    if not use_kernel:
        monkeypatch.setattr(cpu_attention, "kernel", lambda: None)
    ours = layer(q, k, v, meta)
    if not use_kernel:  # decodes and chunks attended as two groups, written back in token order
        assert [group.padded.query_index.shape[1] for group in meta.cached_groups] == [1, 7]
    torch.testing.assert_close(ours, naive_cached_attention(layer, q, meta), atol=1e-5, rtol=1e-5)
