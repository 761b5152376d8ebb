"""`fully_sharded_loras`: A and B both sliced across ranks, so no rank holds a whole adapter.

- column-parallel: B is cut by output rows as in the default mode, and A is cut by its rank
  rows too; each rank shrinks to its rank-slice and one all-gather rebuilds the full
  rank-sized intermediate before the expand.
- row-parallel: A is cut by input columns as in the default mode, and B by output rows;
  the partial rank-sized intermediate is all-reduced, and each rank expands only its slice
  of the output columns, added to the layer's partial sum before its own all-reduce.

The math and the bytes each mode moves per token are in docs/tensor_parallel.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lora.adapter import LoRAModuleWeights
from lora.layers import (
    ColumnParallelLinearWithLoRA,
    LoRAContext,
    RowParallelLinearWithLoRA,
    SlicedWeights,
    SlotSpec,
    scaled_b,
)
from lora.ops import lora_expand, lora_shrink
from workers.distributed import all_gather, all_reduce, divide
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear


def _pad_rank(matrix: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """Zero-pad the LoRA rank dimension up to the slot rank, so it splits evenly over ranks."""
    missing = rank - matrix.shape[dim]
    pad = [0, missing] if dim == matrix.dim() - 1 else [0, 0, 0, missing]
    return F.pad(matrix, pad)


class ColumnParallelLinearWithShardedLoRA(ColumnParallelLinearWithLoRA):
    def __init__(self, base: ColumnParallelLinear, projections: list[str], spec: SlotSpec, context: LoRAContext) -> None:
        self.rank_slice = divide(spec.max_rank, base.tp_size, "max_lora_rank (fully_sharded_loras)")
        self.max_rank = spec.max_rank
        super().__init__(base, projections, spec, context, a_rows=self.rank_slice)

    def slice_adapter(self, modules: dict[str, LoRAModuleWeights]) -> SlicedWeights:
        first = self.base_layer.tp_rank * self.rank_slice
        sliced = {}
        for name, shard in zip(self.projections, self.shards):
            if name in modules:
                weights = modules[name]
                lora_a = _pad_rank(weights.lora_a, 0, self.max_rank)[first : first + self.rank_slice]
                rows = scaled_b(weights)[shard.source_start : shard.source_start + shard.size]
                sliced[name] = (lora_a, _pad_rank(rows, 1, self.max_rank))
        return sliced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        meta = self.context.token_meta
        if meta is None or not meta.has_lora:
            return out
        parts = torch.stack(lora_shrink(x, self.lora_a, meta), dim=1)  # [T, P, rank/tp]
        gathered = all_gather(parts[None], dim=0)  # [tp, T, P, rank/tp]
        full = gathered.permute(1, 2, 0, 3).reshape(x.shape[0], len(self.projections), self.max_rank)
        buffers = [full[:, index].contiguous() for index in range(len(self.projections))]
        lora_expand(buffers, self.lora_b, meta, out, self.offsets)
        return out


class RowParallelLinearWithShardedLoRA(RowParallelLinearWithLoRA):
    def __init__(self, base: RowParallelLinear, projection: str, spec: SlotSpec, context: LoRAContext) -> None:
        self.output_slice = divide(base.output_size, base.tp_size, "output size (fully_sharded_loras)")
        super().__init__(base, projection, spec, context, output_rows=self.output_slice)

    def slice_adapter(self, modules: dict[str, LoRAModuleWeights]) -> SlicedWeights:
        name = self.projections[0]
        if name not in modules:
            return {}
        base = self.base_layer
        weights = modules[name]
        first_input = base.tp_rank * base.input_size
        first_output = base.tp_rank * self.output_slice
        lora_a = weights.lora_a[:, first_input : first_input + base.input_size]
        return {name: (lora_a, scaled_b(weights)[first_output : first_output + self.output_slice])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.base_layer.local_forward(x)
        meta = self.context.token_meta
        if meta is not None and meta.has_lora:
            buffer = all_reduce(lora_shrink(x, self.lora_a[0], meta))
            offset = self.base_layer.tp_rank * self.output_slice
            lora_expand(buffer, self.lora_b[0], meta, partial, offset)
        return self.base_layer.reduce_output(partial)
