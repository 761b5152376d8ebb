"""LoRA layers: one contract (`base.BaseLayerWithLoRA`) and the kinds that keep it, one per
kind of base layer: linear column/row (packed or not), their fully sharded forms, embedding,
lm_head. `layer_kind` finds the kind that wraps a module.
"""

from __future__ import annotations

from torch import nn

from lora.layers.base import BaseLayerWithLoRA, LoRASetup
from lora.layers.fully_sharded import ColumnParallelLinearWithShardedLoRA, RowParallelLinearWithShardedLoRA
from lora.layers.linear import ColumnParallelLinearWithLoRA, RowParallelLinearWithLoRA
from lora.layers.vocab import ParallelLMHeadWithLoRA, VocabParallelEmbeddingWithLoRA

LAYER_KINDS: tuple[type[BaseLayerWithLoRA], ...] = (
    ColumnParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
    ColumnParallelLinearWithShardedLoRA,
    RowParallelLinearWithShardedLoRA,
    VocabParallelEmbeddingWithLoRA,
    ParallelLMHeadWithLoRA,
)


def layer_kind(module: nn.Module, setup: LoRASetup) -> type[BaseLayerWithLoRA] | None:
    """The one kind that wraps `module` under `setup`, or None for a module LoRA leaves alone."""
    kinds = [kind for kind in LAYER_KINDS if kind.can_replace(module, setup)]
    if len(kinds) > 1:
        raise TypeError(f"{type(module).__name__} is claimed by {', '.join(k.__name__ for k in kinds)}")
    return kinds[0] if kinds else None
