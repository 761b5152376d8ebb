"""LoRA layers: each wraps one parallel layer of the base model and adds the batch's adapters.

A wrapper owns its slot buffers (`max_loras` slots of `max_lora_rank`, rank zero-padded,
scaling folded into B) and reads the step's slot mapping from the shared `LoRAContext`.
How an adapter's full A/B are cut for this rank follows the base layer's split:

- column-parallel (q/k/v, gate/up, any column layer): A whole, B cut by the layer's output rows;
- row-parallel (o, down): A cut by the layer's input columns, B whole; each rank's partial
  delta joins the layer's partial sum before its one all-reduce;
- embedding and lm_head: replicated on every rank (the rank-sized tables are small), plus
  the per-slot extra vocabulary rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora.adapter import LoRAAdapter, LoRAModuleWeights
from lora.ops import LoRAStepMetadata, lora_expand, lora_shrink, slot_weights
from lora.ops.layer_weights import LayerLoRAWeights, add_layer_lora
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.linear import ColumnParallelLinear, RowParallelLinear


@dataclass
class LoRAContext:
    """The step's slot mapping, shared by every LoRA layer; the model runner sets it each step."""

    token_meta: LoRAStepMetadata | None = None  # one slot per flat token
    row_meta: LoRAStepMetadata | None = None  # one slot per sampled row (lm_head)
    rope_offsets: torch.Tensor | None = None  # per flat token: where its rotary table starts


@dataclass
class SlotSpec:
    num_slots: int
    max_rank: int
    dtype: torch.dtype
    device: torch.device


SlicedWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]  # projection -> (A [r, in], B·scale [out, r])


def scaled_b(weights: LoRAModuleWeights) -> torch.Tensor:
    return weights.lora_b * weights.scaling


def fill_slot(slot_buffer: torch.Tensor, weights: torch.Tensor | None) -> None:
    """Zero one slot's buffer and copy `weights` into its leading corner (a smaller rank or fewer
    rows than the slot holds leave zeros around it)."""
    slot_buffer.zero_()
    if weights is not None:
        slot_buffer[tuple(slice(0, size) for size in weights.shape)].copy_(weights, non_blocking=True)


class FilledSlots:
    """Which slots hold a non-zero delta for one wrapped layer. An adapter that leaves a module
    out (q/v-only adapters leave most out) zero-fills its buffers there, and a step whose
    adapters all leave the module out skips its LoRA ops instead of multiplying by zeros."""

    def __init__(self) -> None:
        self._slots: set[int] = set()

    def update(self, slot: int, filled: bool) -> None:
        if filled:
            self._slots.add(slot)
        else:
            self._slots.discard(slot)

    def any_in(self, meta: LoRAStepMetadata | None) -> bool:
        return meta is not None and not self._slots.isdisjoint(meta.active_slots)


class LinearWithLoRA(nn.Module):
    """Shared slot handling of the linear wrappers: one A/B buffer pair per projection.

    A packed layer's A matrices are views into one stacked buffer, so its shrink is one
    matmul over all its projections on the torch path.
    """

    def __init__(self, base: nn.Module, projections: list[str], in_features: int, out_sizes: list[int],
                 offsets: list[int], spec: SlotSpec, context: LoRAContext, a_rows: int | None = None) -> None:
        super().__init__()
        self.base_layer = base
        self.projections = projections
        self.context = context
        # The model reads these off its layers (e.g. to split a packed output).
        self.input_size, self.output_size, self.output_sizes = base.input_size, base.output_size, base.output_sizes
        a_rows = spec.max_rank if a_rows is None else a_rows
        self.stacked_a = slot_weights(spec.num_slots, len(projections) * a_rows, in_features, spec.dtype, spec.device)
        self.lora_a = [self.stacked_a[:, i * a_rows : (i + 1) * a_rows] for i in range(len(projections))]
        self.lora_b = [slot_weights(spec.num_slots, size, spec.max_rank, spec.dtype, spec.device) for size in out_sizes]
        self.offsets = offsets
        # Fully sharded layers pair rank slices of A with full-rank B and run their own ops.
        self.weights = (
            LayerLoRAWeights(self.stacked_a, tuple(self.lora_b), tuple(offsets)) if a_rows == spec.max_rank else None
        )
        self.filled = FilledSlots()

    def set_slot(self, slot: int, weights: SlicedWeights) -> None:
        """Copy this rank's slices into `slot`; projections the adapter does not target become zero."""
        for name, a_buffer, b_buffer in zip(self.projections, self.lora_a, self.lora_b):
            lora_a, lora_b = weights.get(name, (None, None))
            fill_slot(a_buffer[slot], lora_a)
            fill_slot(b_buffer[slot], lora_b)
        self.filled.update(slot, any(name in weights for name in self.projections))

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> None:
        meta = self.context.token_meta
        if self.filled.any_in(meta):
            assert self.weights is not None
            add_layer_lora(out, x, self.weights, meta)


class ColumnParallelLinearWithLoRA(LinearWithLoRA):
    """Column layers, packed or not: each projection's delta lands in its own output columns."""

    def __init__(self, base: ColumnParallelLinear, projections: list[str], spec: SlotSpec, context: LoRAContext,
                 a_rows: int | None = None) -> None:
        self.shards = list(base.shards.values())
        super().__init__(base, projections, base.input_size, [s.size for s in self.shards],
                         [s.offset for s in self.shards], spec, context, a_rows)

    def slice_adapter(self, modules: dict[str, LoRAModuleWeights]) -> SlicedWeights:
        sliced = {}
        for name, shard in zip(self.projections, self.shards):
            if name in modules:
                weights = modules[name]
                rows = scaled_b(weights)[shard.source_start : shard.source_start + shard.size]
                sliced[name] = (weights.lora_a, rows)
        return sliced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        self._add(out, x)
        return out


class RowParallelLinearWithLoRA(LinearWithLoRA):
    def __init__(self, base: RowParallelLinear, projection: str, spec: SlotSpec, context: LoRAContext,
                 output_rows: int | None = None) -> None:
        out = base.output_size if output_rows is None else output_rows
        super().__init__(base, [projection], base.input_size, [out], [0], spec, context)

    def slice_adapter(self, modules: dict[str, LoRAModuleWeights]) -> SlicedWeights:
        name = self.projections[0]
        if name not in modules:
            return {}
        base = self.base_layer
        start = base.tp_rank * base.input_size
        weights = modules[name]
        return {name: (weights.lora_a[:, start : start + base.input_size], scaled_b(weights))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.base_layer.local_forward(x)
        self._add(partial, x)
        return self.base_layer.reduce_output(partial)


class VocabParallelEmbeddingWithLoRA(nn.Module):
    """Embedding LoRA (a per-slot lookup table of rank-sized rows) plus per-slot extra vocabulary.

    Token ids at or beyond the base vocabulary read their slot's extra rows.
    """

    def __init__(self, base: VocabParallelEmbedding, spec: SlotSpec, context: LoRAContext, extra_vocab_size: int) -> None:
        super().__init__()
        self.base_layer = base
        self.context = context
        self.vocab_size = base.num_embeddings
        hidden = base.embedding_dim
        self.lora_a = torch.zeros(spec.num_slots, self.vocab_size, spec.max_rank, dtype=spec.dtype, device=spec.device)
        self.lora_b = torch.zeros(spec.num_slots, hidden, spec.max_rank, dtype=spec.dtype, device=spec.device)
        self.extra_rows = (
            torch.zeros(spec.num_slots, extra_vocab_size, hidden, dtype=spec.dtype, device=spec.device)
            if extra_vocab_size else None
        )
        self.filled = FilledSlots()

    def slice_adapter(self, adapter: LoRAAdapter) -> SlicedWeights:
        sliced: SlicedWeights = {}
        if "embed_tokens" in adapter.modules:
            weights = adapter.modules["embed_tokens"]
            sliced["lora"] = (weights.lora_a.t(), scaled_b(weights))
        if adapter.extra_vocab is not None:
            rows = adapter.extra_vocab.input_embeddings
            sliced["extra"] = (rows, rows)
        return sliced

    def set_slot(self, slot: int, weights: SlicedWeights) -> None:
        table, lora_b = weights.get("lora", (None, None))
        fill_slot(self.lora_a[slot], table)
        fill_slot(self.lora_b[slot], lora_b)
        self.filled.update(slot, table is not None)
        if self.extra_rows is not None:
            fill_slot(self.extra_rows[slot], weights.get("extra", (None,))[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        meta = self.context.token_meta
        if self.extra_rows is None or meta is None:
            out = self.base_layer(input_ids)
            is_extra = None
        else:
            is_extra = input_ids >= self.vocab_size
            out = self.base_layer(torch.where(is_extra, 0, input_ids))
            extra_index = is_extra.nonzero().flatten()
            if extra_index.numel():
                rows = self.extra_rows[meta.token_slots[extra_index], input_ids[extra_index] - self.vocab_size]
                out.index_copy_(0, extra_index, rows.to(out.dtype))
        if self.filled.any_in(meta):
            lookup_ids = input_ids.clamp(max=self.vocab_size - 1)
            buffer = self.lora_a[meta.token_slots.clamp(min=0), lookup_ids].float()
            if is_extra is not None:
                buffer.masked_fill_(is_extra[:, None], 0)
            lora_expand(buffer, self.lora_b, meta, out)
        return out


class ParallelLMHeadWithLoRA(nn.Module):
    """lm_head LoRA on the sampled rows, and logit columns for each slot's extra vocabulary.

    With extra vocabulary the logits have `vocab + lora_extra_vocab_size` columns; columns a
    row's adapter does not define are -inf, so they are never sampled.
    """

    def __init__(self, base: ParallelLMHead, spec: SlotSpec, context: LoRAContext, extra_vocab_size: int) -> None:
        super().__init__()
        self.base_layer = base
        self.context = context
        hidden, vocab = base.embedding_dim, base.num_embeddings
        self.lora_a = slot_weights(spec.num_slots, spec.max_rank, hidden, spec.dtype, spec.device)
        self.lora_b = slot_weights(spec.num_slots, vocab, spec.max_rank, spec.dtype, spec.device)
        self.weights = LayerLoRAWeights(self.lora_a, (self.lora_b,), (0,))
        self.extra_vocab_size = extra_vocab_size
        self.extra_rows = torch.zeros(spec.num_slots, extra_vocab_size, hidden, dtype=spec.dtype, device=spec.device)
        self.extra_count = torch.zeros(spec.num_slots, dtype=torch.int64, device=spec.device)
        self.filled, self.extra_filled = FilledSlots(), FilledSlots()

    def slice_adapter(self, adapter: LoRAAdapter) -> SlicedWeights:
        sliced: SlicedWeights = {}
        if "lm_head" in adapter.modules:
            weights = adapter.modules["lm_head"]
            sliced["lora"] = (weights.lora_a, scaled_b(weights))
        extra = adapter.extra_vocab
        if extra is not None and extra.output_embeddings is not None:
            sliced["extra"] = (extra.output_embeddings, extra.output_embeddings)
        return sliced

    def set_slot(self, slot: int, weights: SlicedWeights) -> None:
        lora_a, lora_b = weights.get("lora", (None, None))
        fill_slot(self.lora_a[slot], lora_a)
        fill_slot(self.lora_b[slot], lora_b)
        self.filled.update(slot, lora_a is not None)
        rows = weights.get("extra", (None,))[0]
        fill_slot(self.extra_rows[slot], rows)
        self.extra_count[slot] = 0 if rows is None else rows.shape[0]
        self.extra_filled.update(slot, rows is not None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)
        meta = self.context.row_meta
        if self.filled.any_in(meta):
            add_layer_lora(logits, hidden, self.weights, meta)
        if not self.extra_vocab_size:
            return logits
        extra_logits = torch.full((hidden.shape[0], self.extra_vocab_size), float("-inf"), device=logits.device)
        if self.extra_filled.any_in(meta):
            slots = meta.token_slots
            scores = lora_shrink(hidden, self.extra_rows, meta)
            defined = torch.arange(self.extra_vocab_size, device=logits.device)[None, :] < self.extra_count[slots.clamp(min=0)][:, None]
            extra_logits = torch.where(defined & (slots >= 0)[:, None], scores, extra_logits)
        return torch.cat([logits, extra_logits.to(logits.dtype)], dim=-1)

