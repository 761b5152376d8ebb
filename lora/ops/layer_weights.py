"""A wrapped layer's slot buffers, checked once, and the per-step entry point that uses them.

`add_lora` validates shapes and picks a path on every call, which on a CPU decode step costs
about as much as the C++ kernel itself. A layer's buffers never change shape, so
`LayerLoRAWeights` validates them when the layer is built and keeps the kernel's views ready;
`add_layer_lora` then checks only what changes per step (the activations) before the same
dispatch `add_lora` runs after its checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora.ops import add_lora_unchecked, cpu_ops
from lora.ops.metadata import LoRAStepMetadata


@dataclass(frozen=True)
class LayerLoRAWeights:
    """stacked_a [slots, P*rank, in] (P slices of one rank), lora_b P × [slots, out_i, rank], and
    the output column where each slice's delta lands."""

    stacked_a: torch.Tensor
    lora_b: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    kernel_views: cpu_ops.KernelViews | None = field(init=False)
    in_features: int = field(init=False)
    out_features: int = field(init=False)  # the columns `out` must have: up to the end of the last slice

    def __post_init__(self) -> None:
        slices, (num_slots, stacked_rows, _) = len(self.lora_b), self.stacked_a.shape
        if slices == 0 or len(self.offsets) != slices or stacked_rows % slices:
            raise ValueError(f"{stacked_rows} stacked A rows, {slices} B slices and {len(self.offsets)} offsets do not match")
        rank = stacked_rows // slices
        for b in self.lora_b:
            if b.dim() != 3 or b.shape[0] != num_slots or b.shape[2] != rank:
                raise ValueError(f"lora_b {tuple(b.shape)} does not fit {num_slots} slots of rank {rank}")
        views = cpu_ops.KernelViews.of(self.stacked_a, self.lora_b) if cpu_ops.weights_fit(self.stacked_a, self.lora_b) else None
        object.__setattr__(self, "kernel_views", views)
        object.__setattr__(self, "in_features", self.stacked_a.shape[2])
        object.__setattr__(self, "out_features", max(offset + b.shape[1] for offset, b in zip(self.offsets, self.lora_b)))


def add_layer_lora(out: torch.Tensor, x: torch.Tensor, weights: LayerLoRAWeights, meta: LoRAStepMetadata) -> None:
    """out[t, offset_i:...] += the LoRA delta of x[t] for every LoRA token, slice by slice."""
    tokens, in_features = x.shape if x.dim() == 2 else (-1, -1)
    if tokens != meta.num_tokens or in_features != weights.in_features:
        raise ValueError(f"x {tuple(x.shape)} is not [{meta.num_tokens}, {weights.in_features}]")
    if out.dim() != 2 or out.shape[0] != tokens or out.shape[1] < weights.out_features:
        raise ValueError(f"out {tuple(out.shape)} cannot take {weights.out_features} columns for {tokens} tokens")
    if not meta.has_lora:
        return
    if weights.kernel_views is not None and cpu_ops.inputs_fit(out, x):
        cpu_ops.run(out, x, weights.kernel_views, weights.offsets, meta)
        return
    add_lora_unchecked(out, x, weights.stacked_a, list(weights.lora_b), meta, list(weights.offsets))
