"""Tensor-parallel slicing, checked rank by rank without a process group.

Each test pretends to be rank r of a group (by setting `workers.distributed._state`), builds a
layer, loads full weights through `weight_loader`, and checks that this rank holds exactly
its part. Together the ranks must reproduce the unsharded layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tests.checkpoints import make_random_checkpoint
from workers import distributed
from workers.layers.activation import SiluAndMul
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from workers.layers.rotary import RotaryEmbedding
from workers.models.config import RopeConfig, load_model_config
from workers.models.registry import get_model_class
from workers.weight_loader import load_weights


@contextmanager
def as_rank(rank: int, world_size: int) -> Iterator[None]:
    saved = distributed._state.rank, distributed._state.world_size
    distributed._state.rank, distributed._state.world_size = rank, world_size
    try:
        yield
    finally:
        distributed._state.rank, distributed._state.world_size = saved


def load(layer: torch.nn.Module, name: str, source, shard_id=None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, source, shard_id)


def test_column_parallel_holds_output_rows_and_concatenates_to_full() -> None:
    weight, bias, x = torch.randn(8, 6), torch.randn(8), torch.randn(3, 6)
    outputs = []
    for rank in range(2):
        with as_rank(rank, 2):
            layer = ColumnParallelLinear(6, 8, bias=True)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        assert (layer.output_size, layer.output_sizes, layer.tp_rank) == (4, [4], rank)
        assert torch.equal(layer.weight, weight[4 * rank : 4 * rank + 4])
        outputs.append(layer(x))
    torch.testing.assert_close(torch.cat(outputs, -1), F.linear(x, weight, bias))


def test_row_parallel_holds_input_columns_and_partials_sum_to_full() -> None:
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    partials = []
    for rank in range(2):
        with as_rank(rank, 2):
            layer = RowParallelLinear(8, 5, bias=True)
        load(layer, "weight", weight)
        load(layer, "bias", bias)
        assert (layer.input_size, layer.output_size) == (4, 5)
        assert torch.equal(layer.weight, weight[:, 4 * rank : 4 * rank + 4])
        assert torch.equal(layer.bias, bias)
        partials.append(layer.local_forward(x[:, 4 * rank : 4 * rank + 4]))
    torch.testing.assert_close(sum(partials) + bias, F.linear(x, weight, bias))


def test_merged_column_parallel_splits_each_projection() -> None:
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    for rank in range(2):
        with as_rank(rank, 2):
            layer = MergedColumnParallelLinear(4, [6, 6])
        load(layer, "weight", gate, 0)
        load(layer, "weight", up, 1)
        assert layer.output_sizes == [3, 3]
        assert (layer.shards[1].offset, layer.shards[1].source_start) == (3, 3 * rank)
        rows = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(layer.weight, torch.cat([gate[rows], up[rows]]))
        x = torch.randn(2, 4)
        torch.testing.assert_close(SiluAndMul()(layer(x)), F.silu(x @ gate[rows].T) * (x @ up[rows].T))


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "world_size", "kv_heads_of_rank"),
    [
        (4, 2, 2, [[0], [1]]),  # kv heads split
        (4, 4, 2, [[0, 1], [2, 3]]),  # no GQA
        (4, 1, 2, [[0], [0]]),  # one kv head replicated on both ranks
        (8, 2, 4, [[0], [0], [1], [1]]),  # each kv head replicated on two consecutive ranks
    ],
)
def test_qkv_parallel_gives_each_rank_whole_heads(
    num_heads: int, num_kv_heads: int, world_size: int, kv_heads_of_rank: list[list[int]]
) -> None:
    head_dim, hidden = 2, 8
    q = torch.randn(num_heads * head_dim, hidden)
    k, v = torch.randn(2, num_kv_heads * head_dim, hidden)
    q_bias = torch.randn(num_heads * head_dim)

    def heads(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return torch.cat([tensor[i * head_dim : (i + 1) * head_dim] for i in indices])

    heads_per_rank = num_heads // world_size
    for rank in range(world_size):
        with as_rank(rank, world_size):
            layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=True)
        for shard_id, tensor in zip("qkv", (q, k, v)):
            load(layer, "weight", tensor, shard_id)
            load(layer, "bias", torch.zeros(tensor.shape[0]) if shard_id != "q" else q_bias, shard_id)
        q_heads = list(range(rank * heads_per_rank, (rank + 1) * heads_per_rank))
        kv_heads = kv_heads_of_rank[rank]
        assert (layer.num_heads, layer.num_kv_heads) == (heads_per_rank, len(kv_heads))
        assert layer.output_sizes == [heads_per_rank * head_dim, len(kv_heads) * head_dim, len(kv_heads) * head_dim]
        expected = torch.cat([heads(q, q_heads), heads(k, kv_heads), heads(v, kv_heads)])
        assert torch.equal(layer.weight, expected)
        assert torch.equal(layer.bias[: heads_per_rank * head_dim], heads(q_bias, q_heads))


def test_qkv_refuses_kv_heads_that_do_not_spread_over_ranks() -> None:
    with as_rank(0, 4), pytest.raises(ValueError, match="multiple of the number of kv heads"):
        QKVParallelLinear(8, 2, 12, 3)
    with as_rank(0, 2), pytest.raises(ValueError, match="number of attention heads"):
        QKVParallelLinear(8, 2, 3, 1)


def test_vocab_parallel_pads_the_last_rank(tmp_path: Path) -> None:
    weight = torch.randn(7, 3)
    save_file({"embed": weight}, tmp_path / "embed.safetensors")
    with safe_open(tmp_path / "embed.safetensors", framework="pt") as handle:
        for rank, real_rows in enumerate((4, 3)):
            with as_rank(rank, 2):
                embedding = VocabParallelEmbedding(7, 3)
                head = ParallelLMHead(7, 3)
            load(embedding, "weight", handle.get_slice("embed"))
            assert (embedding.num_embeddings_per_partition, embedding.vocab_start) == (4, 4 * rank)
            assert torch.equal(embedding.weight[:real_rows], weight[4 * rank : 4 * rank + real_rows])
            assert not embedding.weight[real_rows:].any()
            load(head, "weight", handle.get_slice("embed"))
            assert torch.equal(head.weight, embedding.weight)  # same layout, so the two can be tied


def test_loader_checks_the_full_tensor_shape() -> None:
    with as_rank(1, 2):
        layer = ColumnParallelLinear(6, 8)
    with pytest.raises(ValueError, match="expected size 8 in dim 0"):
        load(layer, "weight", torch.randn(10, 6))
    with pytest.raises(ValueError, match="unknown shard 'q'"):
        load(layer, "weight", torch.randn(8, 6), "q")


def test_rotary_matches_rotate_half_form() -> None:
    rope = RotaryEmbedding(head_dim=8, max_position=32, rope=RopeConfig(theta=100.0))
    positions = torch.tensor([0, 5, 31])
    q, k = torch.randn(3, 2 * 8), torch.randn(3, 8)
    got_q, got_k = rope(positions, q, k)
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, 8, 2).float() / 8))
    angles = torch.cat([positions[:, None].float() * inv_freq] * 2, -1)[:, None, :]

    def reference(x: torch.Tensor) -> torch.Tensor:
        x = x.view(3, -1, 8)
        rotated_half = torch.cat([-x[..., 4:], x[..., :4]], -1)
        return (x * angles.cos() + rotated_half * angles.sin()).view(3, -1)

    torch.testing.assert_close(got_q, reference(q))
    torch.testing.assert_close(got_k, reference(k))


def test_whole_model_loads_rank_slices_from_safetensors(tmp_path: Path) -> None:
    """A real checkpoint loaded as rank 1 of 2 holds the second half of every split tensor."""
    model_dir = make_random_checkpoint(tmp_path, "qwen2", vocab_size=255)
    config = load_model_config(model_dir)
    with as_rank(1, 2):
        model = get_model_class(config)(config)
    load_weights(model, model_dir, torch.float32)
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        tensor = handle.get_tensor
        layer = model.model.layers[0]
        q_rows, kv_rows = slice(32, 64), slice(16, 32)  # heads 2-3 of 4, kv head 1 of 2 (head_dim 16)
        expected_qkv = torch.cat([
            tensor("model.layers.0.self_attn.q_proj.weight")[q_rows],
            tensor("model.layers.0.self_attn.k_proj.weight")[kv_rows],
            tensor("model.layers.0.self_attn.v_proj.weight")[kv_rows],
        ])
        assert torch.equal(layer.self_attn.qkv_proj.weight, expected_qkv)
        assert torch.equal(layer.self_attn.o_proj.weight, tensor("model.layers.0.self_attn.o_proj.weight")[:, 32:])
        assert torch.equal(layer.mlp.down_proj.weight, tensor("model.layers.0.mlp.down_proj.weight")[:, 64:])
        assert torch.equal(model.lm_head.weight[:127], tensor("lm_head.weight")[128:])
        assert torch.equal(model.model.norm.weight, tensor("model.norm.weight"))
