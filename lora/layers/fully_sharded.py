"""`fully_sharded_loras`: A and B both sliced across ranks, so no rank holds a whole adapter.

- column-parallel: B is cut by output rows as in the default mode, and A is cut by its rank
  rows too; each rank shrinks to its rank-slice and one all-gather rebuilds the full
  rank-sized intermediate before the expand.
- row-parallel: A is cut by input columns as in the default mode, and B by output rows;
  the partial rank-sized intermediate is all-reduced, and each rank expands only its slice
  of the output columns, added to the layer's partial sum before its own all-reduce.

Both run the worker's backend for the shrink and the expand, with their collective between.
The math and the bytes each mode moves per token are in docs/tensor_parallel.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora.layers.base import LayerAdapter, LayerSlices, LoRASetup, LoRASlice, scaled_b
from lora.layers.linear import ColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA
from workers.distributed import all_gather, all_reduce, divide
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear


def _pad_rank(matrix: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """Zero-pad the LoRA rank dimension up to the slot rank, so it splits evenly over ranks."""
    missing = rank - matrix.shape[dim]
    pad = [0, missing] if dim == matrix.dim() - 1 else [0, 0, 0, missing]
    return F.pad(matrix, pad)


class ColumnParallelLinearWithShardedLoRA(ColumnParallelLinearWithLoRA):
    def __init__(self, base: ColumnParallelLinear, name: str, setup: LoRASetup) -> None:
        self.rank_slice = divide(setup.max_rank, base.tp_size, "max_lora_rank (fully_sharded_loras)")
        self.max_rank = setup.max_rank
        super().__init__(base, name, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, ColumnParallelLinear) and setup.fully_sharded

    def create_slot_buffers(self, setup: LoRASetup) -> None:
        self._allocate(setup, self.rank_slice)  # A's rank rows cut over ranks, B's rank whole

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        first = self.base_layer.tp_rank * self.rank_slice
        sliced = {}
        for name, shard in zip(self.projections, self.shards):
            if name in part.modules:
                weights = part.modules[name]
                lora_a = _pad_rank(weights.lora_a, 0, self.max_rank)[first : first + self.rank_slice]
                rows = scaled_b(weights)[shard.source_start : shard.source_start + shard.size]
                sliced[name] = LoRASlice(lora_a, _pad_rank(rows, 1, self.max_rank))
        return LayerSlices(sliced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        meta = self.backend.token_meta
        if meta is None or not meta.has_lora:
            return out
        parts = torch.stack(self.backend.shrink(x, self.lora_a, meta), dim=1)  # [T, P, rank/tp]
        gathered = all_gather(parts[None], dim=0)  # [tp, T, P, rank/tp]
        full = gathered.permute(1, 2, 0, 3).reshape(x.shape[0], len(self.projections), self.max_rank)
        buffers = [full[:, index].contiguous() for index in range(len(self.projections))]
        self.backend.expand(buffers, self.lora_b, meta, out, self.offsets)
        return out


class RowParallelLinearWithShardedLoRA(RowParallelLinearWithLoRA):
    def __init__(self, base: RowParallelLinear, name: str, setup: LoRASetup) -> None:
        self.output_slice = divide(base.output_size, base.tp_size, "output size (fully_sharded_loras)")
        super().__init__(base, name, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, RowParallelLinear) and setup.fully_sharded

    def _output_rows(self, base: RowParallelLinear) -> int:
        """B cut by output rows: this rank's slice of them."""
        return self.output_slice

    def create_slot_buffers(self, setup: LoRASetup) -> None:
        self._allocate(setup, setup.max_rank)

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        name = self.projections[0]
        if name not in part.modules:
            return LayerSlices()
        base = self.base_layer
        weights = part.modules[name]
        first_input = base.tp_rank * base.input_size
        first_output = base.tp_rank * self.output_slice
        lora_a = weights.lora_a[:, first_input : first_input + base.input_size]
        return LayerSlices({name: LoRASlice(lora_a, scaled_b(weights)[first_output : first_output + self.output_slice])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.base_layer.local_forward(x)
        meta = self.backend.token_meta
        if meta is not None and meta.has_lora:
            buffer = all_reduce(self.backend.shrink(x, self.lora_a[0], meta))
            offset = self.base_layer.tp_rank * self.output_slice
            self.backend.expand(buffer, self.lora_b[0], meta, partial, offset)
        return self.base_layer.reduce_output(partial)
