"""LoRA on the linear layers: how an adapter's full A/B are cut for this rank follows the base
layer's split.

- column-parallel (q/k/v, gate/up, any column layer): A whole, B cut by the layer's output rows;
- row-parallel (o, down): A cut by the layer's input columns, B whole; each rank's partial
  delta joins the layer's partial sum before its one all-reduce.

`fully_sharded_loras` cuts both; those kinds are in `lora.layers.fully_sharded`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lora.layers.base import (
    BaseLayerWithLoRA,
    LayerAdapter,
    LayerSlices,
    LoRASetup,
    LoRASlice,
    fill_slot,
    scaled_b,
)
from lora.ops.backend import PackedLoRAWeights
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


class LinearWithLoRA(BaseLayerWithLoRA):
    """Shared slot handling of the linear kinds: one A/B buffer pair per projection.

    A packed layer's A matrices are views into one stacked buffer, so the backend shrinks all
    its projections at once where it can.
    """

    projections: list[str]  # checkpoint projections, in the order of their output columns
    in_features: int
    b_rows: list[int]  # each projection's output rows on this rank
    offsets: list[int]  # where each projection's delta lands in the layer's output

    def __init__(self, base: nn.Module, name: str, setup: LoRASetup) -> None:
        prefix = f"layers.{layer_index(name)}."
        leaf = name.rsplit(".", 1)[-1]
        super().__init__(base, prefix + leaf, {p: prefix + p for p in self.projections}, setup)
        # The model reads these off its layers (e.g. to split a packed output).
        self.input_size, self.output_size, self.output_sizes = base.input_size, base.output_size, base.output_sizes

    def create_slot_buffers(self, setup: LoRASetup) -> None:
        self._allocate(setup, setup.max_rank)
        self.packed: PackedLoRAWeights = self.backend.pack(self.stacked_a, self.lora_b, self.offsets)

    def _allocate(self, setup: LoRASetup, a_rows: int) -> None:
        self.stacked_a = self.backend.slot_weights(len(self.projections) * a_rows, self.in_features, setup.dtype)
        self.lora_a = [self.stacked_a[:, i * a_rows : (i + 1) * a_rows] for i in range(len(self.projections))]
        self.lora_b = [self.backend.slot_weights(rows, setup.max_rank, setup.dtype) for rows in self.b_rows]

    def set_slot(self, slot: int, slices: LayerSlices) -> None:
        for name, a_buffer, b_buffer in zip(self.projections, self.lora_a, self.lora_b):
            part = slices.projections.get(name)
            fill_slot(a_buffer[slot], None if part is None else part.lora_a)
            fill_slot(b_buffer[slot], None if part is None else part.lora_b)
        self.filled.update(slot, any(name in slices.projections for name in self.projections))

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor) -> None:
        meta = self.backend.token_meta
        if meta is not None and self.filled.any_in(meta):
            self.backend.add_packed(out, x, self.packed, meta)


class ColumnParallelLinearWithLoRA(LinearWithLoRA):
    """Column layers, packed or not: each projection's delta lands in its own output columns."""

    def __init__(self, base: ColumnParallelLinear, name: str, setup: LoRASetup) -> None:
        leaf = name.rsplit(".", 1)[-1]
        self.projections = list(setup.packed_modules.get(leaf, [leaf]))
        self.shards = list(base.shards.values())
        self.in_features = base.input_size
        self.b_rows = [shard.size for shard in self.shards]
        self.offsets = [shard.offset for shard in self.shards]
        super().__init__(base, name, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, ColumnParallelLinear) and not setup.fully_sharded

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        sliced = {}
        for name, shard in zip(self.projections, self.shards):
            if name in part.modules:
                weights = part.modules[name]
                rows = scaled_b(weights)[shard.source_start : shard.source_start + shard.size]
                sliced[name] = LoRASlice(weights.lora_a, rows)
        return LayerSlices(sliced)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        self._add_lora(out, x)
        return out


class RowParallelLinearWithLoRA(LinearWithLoRA):
    def __init__(self, base: RowParallelLinear, name: str, setup: LoRASetup) -> None:
        self.projections = [name.rsplit(".", 1)[-1]]
        self.in_features = base.input_size
        self.b_rows = [self._output_rows(base)]
        self.offsets = [0]
        super().__init__(base, name, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, RowParallelLinear) and not setup.fully_sharded

    def _output_rows(self, base: RowParallelLinear) -> int:
        """The rows of B this rank holds: all of them (B whole)."""
        return base.output_size

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        name = self.projections[0]
        if name not in part.modules:
            return LayerSlices()
        base = self.base_layer
        start = base.tp_rank * base.input_size
        weights = part.modules[name]
        return LayerSlices({name: LoRASlice(weights.lora_a[:, start : start + base.input_size], scaled_b(weights))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.base_layer.local_forward(x)
        self._add_lora(partial, x)
        return self.base_layer.reduce_output(partial)


def layer_index(module_name: str) -> int:
    """The decoder layer a module belongs to ("model.layers.3.self_attn.qkv_proj" -> 3)."""
    match = _LAYER_INDEX.search(module_name + ".")
    if match is None:
        raise ValueError(f"cannot tell which decoder layer {module_name!r} belongs to")
    return int(match.group(1))
