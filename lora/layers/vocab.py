"""LoRA on the vocabulary layers: the embedding and lm_head, replicated on every rank (their
rank-sized tables are small), plus each slot's extra vocabulary rows
(`lora_extra_vocab_size`: tokens an adapter adds).
"""

from __future__ import annotations

import torch
from torch import nn

from lora.layers.base import (
    BaseLayerWithLoRA,
    FilledSlots,
    LayerAdapter,
    LayerSlices,
    LoRASetup,
    LoRASlice,
    fill_slot,
    scaled_b,
)
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding

EMBEDDING, LM_HEAD = "embed_tokens", "lm_head"


class VocabParallelEmbeddingWithLoRA(BaseLayerWithLoRA):
    """Embedding LoRA (a per-slot lookup table of rank-sized rows) plus per-slot extra vocabulary.

    Token ids at or beyond the base vocabulary read their slot's extra rows.
    """

    def __init__(self, base: VocabParallelEmbedding, name: str, setup: LoRASetup) -> None:
        self.vocab_size = base.num_embeddings
        super().__init__(base, EMBEDDING, {EMBEDDING: EMBEDDING}, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)

    def create_slot_buffers(self, setup: LoRASetup) -> None:
        hidden = self.base_layer.embedding_dim
        # A is looked up by token id, not multiplied: a plain [slots, vocab, rank] table.
        self.lora_a = torch.zeros(setup.num_slots, self.vocab_size, setup.max_rank, dtype=setup.dtype, device=setup.device)
        self.lora_b = self.backend.slot_weights(hidden, setup.max_rank, setup.dtype)
        self.extra_rows = (
            torch.zeros(setup.num_slots, setup.extra_vocab_size, hidden, dtype=setup.dtype, device=setup.device)
            if setup.extra_vocab_size else None
        )

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        weights = part.modules.get(EMBEDDING)
        projections = {} if weights is None else {EMBEDDING: LoRASlice(weights.lora_a.t(), scaled_b(weights))}
        extra = None if part.extra_vocab is None else part.extra_vocab.input_embeddings
        return LayerSlices(projections, extra)

    def set_slot(self, slot: int, slices: LayerSlices) -> None:
        part = slices.projections.get(EMBEDDING)
        fill_slot(self.lora_a[slot], None if part is None else part.lora_a)
        fill_slot(self.lora_b[slot], None if part is None else part.lora_b)
        self.filled.update(slot, part is not None)
        if self.extra_rows is not None:
            fill_slot(self.extra_rows[slot], slices.extra_rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        meta = self.backend.token_meta
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
        if meta is not None and self.filled.any_in(meta):
            lookup_ids = input_ids.clamp(max=self.vocab_size - 1)
            buffer = self.lora_a[meta.token_slots.clamp(min=0), lookup_ids].float()
            if is_extra is not None:
                buffer.masked_fill_(is_extra[:, None], 0)
            self.backend.expand(buffer, self.lora_b, meta, out)
        return out


class ParallelLMHeadWithLoRA(BaseLayerWithLoRA):
    """lm_head LoRA on the sampled rows, and logit columns for each slot's extra vocabulary.

    With extra vocabulary the logits have `vocab + lora_extra_vocab_size` columns; columns a
    row's adapter does not define are -inf, so they are never sampled.
    """

    def __init__(self, base: ParallelLMHead, name: str, setup: LoRASetup) -> None:
        self.extra_vocab_size = setup.extra_vocab_size
        self.extra_filled = FilledSlots()
        super().__init__(base, LM_HEAD, {LM_HEAD: LM_HEAD}, setup)

    @classmethod
    def can_replace(cls, module: nn.Module, setup: LoRASetup) -> bool:
        return isinstance(module, ParallelLMHead)

    def create_slot_buffers(self, setup: LoRASetup) -> None:
        hidden, vocab = self.base_layer.embedding_dim, self.base_layer.num_embeddings
        self.lora_a = self.backend.slot_weights(setup.max_rank, hidden, setup.dtype)
        self.lora_b = self.backend.slot_weights(vocab, setup.max_rank, setup.dtype)
        self.packed = self.backend.pack(self.lora_a, (self.lora_b,), (0,))
        # Scored like an A (hidden -> one logit per extra token), so stored as the backend stores A's.
        self.extra_rows = self.backend.slot_weights(setup.extra_vocab_size, hidden, setup.dtype)
        self.extra_count = torch.zeros(setup.num_slots, dtype=torch.int64, device=setup.device)

    def slice_adapter(self, part: LayerAdapter) -> LayerSlices:
        weights = part.modules.get(LM_HEAD)
        projections = {} if weights is None else {LM_HEAD: LoRASlice(weights.lora_a, scaled_b(weights))}
        extra = None if part.extra_vocab is None else part.extra_vocab.output_embeddings
        return LayerSlices(projections, extra)

    def set_slot(self, slot: int, slices: LayerSlices) -> None:
        part = slices.projections.get(LM_HEAD)
        fill_slot(self.lora_a[slot], None if part is None else part.lora_a)
        fill_slot(self.lora_b[slot], None if part is None else part.lora_b)
        self.filled.update(slot, part is not None)
        rows = slices.extra_rows
        fill_slot(self.extra_rows[slot], rows)
        self.extra_count[slot] = 0 if rows is None else rows.shape[0]
        self.extra_filled.update(slot, rows is not None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base_layer(hidden)
        meta = self.backend.row_meta
        if meta is not None and self.filled.any_in(meta):
            self.backend.add_packed(logits, hidden, self.packed, meta)
        if not self.extra_vocab_size:
            return logits
        extra_logits = torch.full((hidden.shape[0], self.extra_vocab_size), float("-inf"), device=logits.device)
        if meta is not None and self.extra_filled.any_in(meta):
            slots = meta.token_slots
            scores = self.backend.shrink(hidden, self.extra_rows, meta)
            defined = torch.arange(self.extra_vocab_size, device=logits.device)[None, :] < self.extra_count[slots.clamp(min=0)][:, None]
            extra_logits = torch.where(defined & (slots >= 0)[:, None], scores, extra_logits)
        return torch.cat([logits, extra_logits.to(logits.dtype)], dim=-1)
