"""Tensor-parallel linear layers (Megatron split), usable unchanged at world size 1.

Column-parallel layers split the output features: each rank computes its slice of y and no
communication happens, so a column layer feeding a row layer (qkv -> o, gate_up -> down)
needs one all-reduce per pair. Packed layers (qkv, gate_up) hold several checkpoint
projections side by side; `shards` records where each one sits in this rank's output, which is
what a LoRA wrapper needs to add per-projection deltas in the right columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workers.distributed import all_reduce, divide, tp_rank, tp_world_size
from workers.layers.prepacked import linear
from workers.weight_loader import ShardId, WeightSource, copy_checked, read_all, read_slice


@dataclass(frozen=True)
class OutputShard:
    """One packed projection (q, k, v, gate, up, or the whole output) on this rank."""

    offset: int  # first column of this projection in this rank's output
    size: int  # columns this rank holds
    source_start: int  # first row this rank reads from the full checkpoint tensor
    full_size: int  # rows of the full checkpoint tensor


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x·Wᵀ + b with W's output rows split over ranks; returns this rank's columns of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self._setup(input_size, {None: self._even_split(output_size)}, bias)

    def _even_split(self, full_size: int) -> tuple[int, int, int]:
        size = divide(full_size, tp_world_size(), "output size")
        return size, tp_rank() * size, full_size

    def _setup(self, input_size: int, plan: dict[ShardId, tuple[int, int, int]], bias: bool) -> None:
        """`plan` maps shard id -> (size on this rank, first source row, full source rows)."""
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.input_size = input_size
        self.shards: dict[ShardId, OutputShard] = {}
        offset = 0
        for shard_id, (size, source_start, full_size) in plan.items():
            self.shards[shard_id] = OutputShard(offset, size, source_start, full_size)
            offset += size
        self.output_size = offset
        self.output_sizes = [shard.size for shard in self.shards.values()]
        self.weight = _parameter(self.output_size, input_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _parameter(self.output_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
        if shard_id not in self.shards:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.shards)}")
        shard = self.shards[shard_id]
        rows = read_slice(source, 0, shard.source_start, shard.size, shard.full_size)
        copy_checked(param.data.narrow(0, shard.offset, shard.size), rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections of the same input packed into one matmul (gate_up: shards 0 and 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        nn.Module.__init__(self)
        self._setup(input_size, {index: self._even_split(size) for index, size in enumerate(output_sizes)}, bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v packed by heads (shards "q", "k", "v"); each rank holds whole heads.

    With more ranks than kv heads (GQA), each kv head is replicated on tp/num_kv_heads
    consecutive ranks so every rank has exactly one.
    """

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        nn.Module.__init__(self)
        rank, world = tp_rank(), tp_world_size()
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, world, "number of attention heads")
        if world >= num_kv_heads:
            if world % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size ({world}) must be a multiple of the number of kv heads ({num_kv_heads})"
                )
            self.num_kv_heads, first_kv_head = 1, rank // (world // num_kv_heads)
        else:
            self.num_kv_heads = divide(num_kv_heads, world, "number of kv heads")
            first_kv_head = rank * self.num_kv_heads
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        kv_shard = (kv_size, first_kv_head * head_dim, num_kv_heads * head_dim)
        plan = {"q": (q_size, rank * q_size, num_heads * head_dim), "k": kv_shard, "v": kv_shard}
        self._setup(hidden_size, plan, bias)


class RowParallelLinear(nn.Module):
    """y = x·Wᵀ + b with W's input columns split over ranks; x is this rank's slice of the input.

    Each rank's partial product is summed by an all-reduce; the bias is added once, after it.
    `local_forward` and `reduce_output` are the two halves, so a LoRA wrapper can add its
    own partial delta before the single all-reduce.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.input_size = divide(input_size, self.tp_size, "input size")
        self.output_size = output_size
        self.output_sizes = [output_size]
        self.weight = _parameter(output_size, self.input_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _parameter(output_size)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"row-parallel layers are not packed, got shard {shard_id!r}")
        if param.dim() == 1:  # the bias is replicated
            copy_checked(param.data, read_all(source))
            return
        full_input = self.input_size * self.tp_size
        copy_checked(param.data, read_slice(source, 1, self.tp_rank * self.input_size, self.input_size, full_input))

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, before the all-reduce and without bias."""
        return linear(x, self.weight)

    def reduce_output(self, partial: torch.Tensor) -> torch.Tensor:
        out = all_reduce(partial)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce_output(self.local_forward(x))
