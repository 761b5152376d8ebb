"""Long-context LoRA (`long_lora_scaling_factors`): one rotary table per scaling factor, chosen
per sequence by the adapter it runs with.

The tables sit end to end — the base model's rope first, then one linear-scaled copy per factor
— so a token reads its table by adding its sequence's table offset to its position; a batch
can mix base requests and adapters trained for different context lengths.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from workers.layers.rotary import RotaryEmbedding
from workers.models.config import RopeConfig


class LongContextRotaryEmbedding(RotaryEmbedding):
    def __init__(self, head_dim: int, table_len: int, base_rope: RopeConfig, factors: tuple[float, ...]) -> None:
        if base_rope.rope_type not in ("default", "linear"):
            raise ValueError(
                f"long_lora_scaling_factors needs a model with plain or linear rope, not {base_rope.rope_type!r}"
            )
        super().__init__(head_dim, table_len, base_rope)
        scaled = [
            RotaryEmbedding(head_dim, table_len, replace(base_rope, rope_type="linear", factor=base_rope.factor * f))
            for f in factors
        ]
        self.cos = torch.cat([self.cos, *(table.cos for table in scaled)])
        self.sin = torch.cat([self.sin, *(table.sin for table in scaled)])
        self.table_len = table_len
        self.offsets: torch.Tensor | None = None  # per flat token: where its table starts; the LoRA manager sets it each step

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(positions if self.offsets is None else positions + self.offsets, q, k)
