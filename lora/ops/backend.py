"""The LoRA backend contract: one object per worker, chosen once when the worker starts, that
owns the step's slot metadata, the layout of the slot buffers, and the batched multi-LoRA ops.

Shapes: x [T, in] (2-D, contiguous rows); lora_a [num_slots, max_rank, in];
lora_b [num_slots, out, max_rank] (rank zero-padded, scaling folded into B);
buffer [T, max_rank] float32; out [T, total_out]. Inputs may be fp32/fp16/bf16; products
accumulate in fp32. Tokens whose slot is -1 are never read or written.

Packed layers (qkv, gate_up) pass lists: one A/B pair per projection, and either one
`offset` (the slices sit side by side from there) or one offset per slice. A layer's own
buffers come from `slot_weights` (each backend stores them its own way, behind
[slots, rows, cols] views) and are checked once by `pack`; its per-step call is `add_packed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lora.ops.metadata import LoRAStepMetadata

Tensors = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class PackedLoRAWeights:
    """A layer's slot buffers, checked once when the layer is built: stacked_a [slots, P*rank, in]
    (P slices of one rank), lora_b P × [slots, out_i, rank], and the output column where each
    slice's delta lands. A layer's buffers never change shape, so per step only the activations
    need checking (`check_step`)."""

    stacked_a: torch.Tensor
    lora_b: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
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
        object.__setattr__(self, "in_features", self.stacked_a.shape[2])
        object.__setattr__(self, "out_features", max(offset + b.shape[1] for offset, b in zip(self.offsets, self.lora_b)))

    def check_step(self, out: torch.Tensor, x: torch.Tensor, meta: LoRAStepMetadata) -> None:
        tokens, in_features = x.shape if x.dim() == 2 else (-1, -1)
        if tokens != meta.num_tokens or in_features != self.in_features:
            raise ValueError(f"x {tuple(x.shape)} is not [{meta.num_tokens}, {self.in_features}]")
        if out.dim() != 2 or out.shape[0] != tokens or out.shape[1] < self.out_features:
            raise ValueError(f"out {tuple(out.shape)} cannot take {self.out_features} columns for {tokens} tokens")


class LoRABackend(ABC):
    """How a worker computes LoRA deltas: the step's metadata, the buffers' layout, the ops.

    The model runner sets the step once (`set_step`); every LoRA layer reads `token_meta`
    (one slot per flat token) or `row_meta` (one slot per sampled row, for lm_head) from the
    backend it was built with, so no layer decides a path or reads configuration per call.
    """

    def __init__(self, num_slots: int, device: torch.device | str = "cpu") -> None:
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.token_meta: LoRAStepMetadata | None = None
        self.row_meta: LoRAStepMetadata | None = None

    # ---- the step ---------------------------------------------------------------------------

    def set_step(self, seq_slots: np.ndarray | None, query_lens: np.ndarray) -> None:
        """Index the step for every LoRA layer at once: each sequence's slot (-1 = base model)
        repeated over its tokens, and once per sampled row; None when no sequence has an adapter."""
        if seq_slots is None:
            self.token_meta = self.row_meta = None
            return
        token_slots = np.repeat(seq_slots, query_lens)
        self.token_meta = self.build_metadata(token_slots)
        one_token_each = len(token_slots) == len(seq_slots)  # decode: the sampled rows are the tokens
        self.row_meta = self.token_meta if one_token_each else self.build_metadata(seq_slots)

    def build_metadata(self, token_slots: torch.Tensor | np.ndarray | Sequence[int]) -> LoRAStepMetadata:
        return LoRAStepMetadata.build(token_slots, self.num_slots, self.device)

    # ---- layout -----------------------------------------------------------------------------

    def slot_weights(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """Zeroed per-slot weights [num_slots, rows, cols], stored the way this backend reads best."""
        return torch.zeros(self.num_slots, rows, cols, dtype=dtype, device=self.device)

    def pack(self, stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor], offsets: Sequence[int]) -> PackedLoRAWeights:
        """A layer's buffers, checked once, ready for `add_packed`."""
        return PackedLoRAWeights(stacked_a, tuple(lora_b), tuple(offsets))

    # ---- ops --------------------------------------------------------------------------------

    def shrink(
        self, x: torch.Tensor, lora_a: Tensors, meta: LoRAStepMetadata, out: Tensors | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """buffer[t] = x[t] @ lora_a[slot[t]].T; a list of A's gives a list of buffers.

        A new buffer is zero-filled; a given `out` keeps its base-token rows as they were.
        """
        if not isinstance(lora_a, torch.Tensor):
            outs = out if out is not None else [None] * len(lora_a)
            return [self.shrink(x, a, meta, o) for a, o in zip(lora_a, outs)]
        check_shrink(x, lora_a, meta)
        buffer = out if out is not None else x.new_zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
        assert isinstance(buffer, torch.Tensor)
        if meta.has_lora:
            self._shrink(x, lora_a, meta, buffer)
        return buffer

    def expand(
        self, buffer: Tensors, lora_b: Tensors, meta: LoRAStepMetadata, out: torch.Tensor, offset: int | Sequence[int] = 0
    ) -> None:
        """out[t, offset:offset+size] += buffer[t] @ lora_b[slot[t]].T, in place; lists expand packed slices."""
        buffers, bs = as_list(buffer), as_list(lora_b)
        if len(buffers) != len(bs):
            raise ValueError(f"{len(buffers)} buffers for {len(bs)} B matrices")
        for h, b, col in zip(buffers, bs, slice_offsets(bs, offset)):
            if h.dim() != 2 or h.shape[0] != meta.num_tokens:
                raise ValueError(f"buffer {tuple(h.shape)} is not [{meta.num_tokens}, rank]")
            check_expand(h.shape[1], b, meta, out, col)
            if meta.has_lora:
                self._expand(h, b, meta, out, col)

    def add_lora(
        self, out: torch.Tensor, x: torch.Tensor, lora_a: Tensors, lora_b: Tensors, meta: LoRAStepMetadata,
        offset: int | Sequence[int] = 0,
    ) -> None:
        """out[:, offset:...] += LoRA delta of x: shrink then expand, on any operands (checked each call).

        A packed layer may pass its A matrices as a list or stacked in one [slots, P*rank, in]
        tensor (then one shrink serves every slice where the backend fuses them).
        """
        b_list = as_list(lora_b)
        offsets = slice_offsets(b_list, offset)
        if isinstance(lora_a, torch.Tensor):
            check_stacked(x, lora_a, b_list, meta)
        elif len(lora_a) != len(b_list):
            raise ValueError(f"{len(lora_a)} A matrices for {len(b_list)} B matrices")
        else:
            for a in lora_a:
                check_shrink(x, a, meta)
        for a_rows, b, col in zip(slice_ranks(lora_a, b_list), b_list, offsets):
            check_expand(a_rows, b, meta, out, col)
        if not meta.has_lora:
            return
        if isinstance(lora_a, torch.Tensor):
            self._add_stacked(out, x, lora_a, b_list, meta, offsets)
            return
        for a, b, col in zip(lora_a, b_list, offsets):  # separate A matrices, possibly of different ranks
            self._add_stacked(out, x, a, [b], meta, [col])

    def add_packed(self, out: torch.Tensor, x: torch.Tensor, weights: PackedLoRAWeights, meta: LoRAStepMetadata) -> None:
        """A layer's per-step call: out[t, offset_i:...] += the delta of x[t] for every LoRA token."""
        weights.check_step(out, x, meta)
        if meta.has_lora:
            self._add_stacked(out, x, weights.stacked_a, list(weights.lora_b), meta, list(weights.offsets))

    # ---- what each backend computes its own way ---------------------------------------------

    @abstractmethod
    def _shrink(self, x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAStepMetadata, buffer: torch.Tensor) -> None:
        """buffer[t] = x[t] @ lora_a[slot[t]].T for every LoRA token, on checked operands."""

    @abstractmethod
    def _expand(
        self, buffer: torch.Tensor, lora_b: torch.Tensor, meta: LoRAStepMetadata, out: torch.Tensor, offset: int
    ) -> None:
        """out[t, offset:offset+N] += buffer[t] @ lora_b[slot[t]].T for every LoRA token, on checked operands."""

    def _add_stacked(
        self, out: torch.Tensor, x: torch.Tensor, stacked_a: torch.Tensor, lora_b: list[torch.Tensor],
        meta: LoRAStepMetadata, offsets: list[int],
    ) -> None:
        """Shrink every slice of a stacked A, then expand each: backends that fuse them override this."""
        rank = stacked_rank(stacked_a, lora_b)
        for index, (b, col) in enumerate(zip(lora_b, offsets)):
            buffer = x.new_zeros(x.shape[0], rank, dtype=torch.float32)
            self._shrink(x, stacked_a[:, index * rank : (index + 1) * rank], meta, buffer)
            self._expand(buffer, b, meta, out, col)


def as_list(tensors: Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def slice_offsets(lora_b: list[torch.Tensor], offset: int | Sequence[int]) -> list[int]:
    """One column offset per slice: given, or the slices laid side by side from `offset`."""
    if not isinstance(offset, int):
        if len(offset) != len(lora_b):
            raise ValueError(f"{len(offset)} offsets for {len(lora_b)} slices")
        return list(offset)
    offsets = []
    for b in lora_b:
        offsets.append(offset)
        offset += b.shape[1]
    return offsets


def stacked_rank(stacked_a: torch.Tensor, lora_b: Sequence[torch.Tensor]) -> int:
    return stacked_a.shape[1] // max(1, len(lora_b))


def slice_ranks(lora_a: Tensors, lora_b: list[torch.Tensor]) -> list[int]:
    """The rank of each slice's A: its own rows, or its share of a stacked A."""
    if isinstance(lora_a, torch.Tensor):
        return [stacked_rank(lora_a, lora_b)] * len(lora_b)
    return [a.shape[1] for a in lora_a]


def check_stacked(x: torch.Tensor, stacked_a: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAStepMetadata) -> None:
    """A stacked A holds one slice of `rank` rows per B matrix, all of one rank."""
    check_shrink(x, stacked_a, meta)
    if stacked_a.shape[1] != stacked_rank(stacked_a, lora_b) * len(lora_b):
        raise ValueError(f"lora_a {tuple(stacked_a.shape)} does not stack {len(lora_b)} slices of one rank")


def check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAStepMetadata) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or x.shape[1] != lora_a.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} does not match lora_a {tuple(lora_a.shape)}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, metadata {meta.num_tokens}")


def check_expand(rank: int, lora_b: torch.Tensor, meta: LoRAStepMetadata, out: torch.Tensor, offset: int) -> None:
    if lora_b.dim() != 3 or lora_b.shape[2] != rank:
        raise ValueError(f"rank {rank} does not match lora_b {tuple(lora_b.shape)}")
    if out.shape[0] != meta.num_tokens or offset < 0 or offset + lora_b.shape[1] > out.shape[1]:
        raise ValueError(f"out {tuple(out.shape)} cannot take {lora_b.shape[1]} columns at {offset}")
