"""Batched multi-LoRA ops (Punica pattern): one batch, many adapters, one slot index per token.

Shapes: x [T, in] (2-D, contiguous rows); lora_a [num_slots, max_rank, in];
lora_b [num_slots, out, max_rank] (rank zero-padded, scaling folded into B);
buffer [T, max_rank] float32; out [T, total_out]. Inputs may be fp32/fp16/bf16; products
accumulate in fp32. Tokens whose slot is -1 are never read or written.

Packed layers (qkv, gate_up) pass lists: one A/B pair per projection, and either one
`offset` (the slices sit side by side from there) or one offset per slice.

Backend: Triton for CUDA tensors, torch otherwise; `RAYLORA_LORA_OPS=torch|triton`
forces one (Triton on CPU needs `TRITON_INTERPRET=1` set before the kernels import).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from functools import cache
from types import ModuleType

import torch

from lora.ops import torch_ops
from lora.ops.cpu_ops import slot_weights
from lora.ops.metadata import LoRAStepMetadata

__all__ = ["LoRAStepMetadata", "add_lora", "add_lora_unchecked", "lora_expand", "lora_shrink", "slot_weights"]

BACKEND_ENV = "RAYLORA_LORA_OPS"

Tensors = torch.Tensor | Sequence[torch.Tensor]


def lora_shrink(
    x: torch.Tensor, lora_a: Tensors, meta: LoRAStepMetadata, out: Tensors | None = None
) -> torch.Tensor | list[torch.Tensor]:
    """buffer[t] = x[t] @ lora_a[slot[t]].T; a list of A's gives a list of buffers.

    A new buffer is zero-filled; a given `out` keeps its base-token rows as they were.
    """
    if not isinstance(lora_a, torch.Tensor):
        outs = out if out is not None else [None] * len(lora_a)
        return [lora_shrink(x, a, meta, o) for a, o in zip(lora_a, outs)]
    _check_shrink(x, lora_a, meta)
    buffer = out if out is not None else x.new_zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32)
    if meta.has_lora:
        _backend(x).shrink(x, lora_a, meta, buffer)
    return buffer


def lora_expand(
    buffer: Tensors,
    lora_b: Tensors,
    meta: LoRAStepMetadata,
    out: torch.Tensor,
    offset: int | Sequence[int] = 0,
) -> None:
    """out[t, offset:offset+size] += buffer[t] @ lora_b[slot[t]].T, in place; lists expand packed slices."""
    buffers, bs = _as_list(buffer), _as_list(lora_b)
    if len(buffers) != len(bs):
        raise ValueError(f"{len(buffers)} buffers for {len(bs)} B matrices")
    for h, b, col in zip(buffers, bs, _slice_offsets(bs, offset)):
        if h.dim() != 2 or h.shape[0] != meta.num_tokens:
            raise ValueError(f"buffer {tuple(h.shape)} is not [{meta.num_tokens}, rank]")
        _check_expand(h.shape[1], b, meta, out, col)
        if meta.has_lora:
            _backend(out).expand(h, b, meta, out, col)


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: Tensors,
    lora_b: Tensors,
    meta: LoRAStepMetadata,
    offset: int | Sequence[int] = 0,
) -> None:
    """out[:, offset:...] += LoRA delta of x: shrink then expand, fused on the torch path.

    A packed layer may pass its A matrices as a list or stacked in one [slots, P*rank, in]
    tensor (then one shrink serves every slice on the torch path).
    """
    b_list = _as_list(lora_b)
    offsets = _slice_offsets(b_list, offset)
    if isinstance(lora_a, torch.Tensor):
        _check_stacked(x, lora_a, b_list, meta)
    elif len(lora_a) != len(b_list):
        raise ValueError(f"{len(lora_a)} A matrices for {len(b_list)} B matrices")
    else:
        for a in lora_a:
            _check_shrink(x, a, meta)
    for a_rows, b, col in zip(_ranks(lora_a, b_list), b_list, offsets):
        _check_expand(a_rows, b, meta, out, col)
    add_lora_unchecked(out, x, lora_a, b_list, meta, offsets)


def add_lora_unchecked(
    out: torch.Tensor, x: torch.Tensor, lora_a: Tensors, lora_b: list[torch.Tensor], meta: LoRAStepMetadata,
    offsets: list[int],
) -> None:
    """`add_lora` on operands already checked (a layer checks its buffers once, when it is built)."""
    if not meta.has_lora:
        return
    backend = _backend(x)
    if backend is torch_ops:
        if isinstance(lora_a, torch.Tensor):
            torch_ops.add_lora(out, x, lora_a, lora_b, meta, offsets)
        else:  # separate A matrices, possibly of different ranks: one pair at a time
            for a, b, col in zip(lora_a, lora_b, offsets):
                torch_ops.add_lora(out, x, a, [b], meta, [col])
        return
    lora_expand(lora_shrink(x, _split_stacked(lora_a, lora_b), meta), lora_b, meta, out, offsets)


def _check_stacked(x: torch.Tensor, stacked_a: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAStepMetadata) -> None:
    """A stacked A holds one slice of `rank` rows per B matrix, all of one rank."""
    _check_shrink(x, stacked_a, meta)
    if stacked_a.shape[1] != _stacked_rank(stacked_a, lora_b) * len(lora_b):
        raise ValueError(f"lora_a {tuple(stacked_a.shape)} does not stack {len(lora_b)} slices of one rank")


def _stacked_rank(stacked_a: torch.Tensor, lora_b: list[torch.Tensor]) -> int:
    return stacked_a.shape[1] // max(1, len(lora_b))


def _ranks(lora_a: Tensors, lora_b: list[torch.Tensor]) -> list[int]:
    """The rank of each slice's A: its own rows, or its share of a stacked A."""
    if isinstance(lora_a, torch.Tensor):
        return [_stacked_rank(lora_a, lora_b)] * len(lora_b)
    return [a.shape[1] for a in lora_a]


def _split_stacked(lora_a: Tensors, lora_b: list[torch.Tensor]) -> list[torch.Tensor]:
    """One view per slice of a stacked A; a list as it is."""
    if not isinstance(lora_a, torch.Tensor):
        return list(lora_a)
    rank = _stacked_rank(lora_a, lora_b)
    return [lora_a[:, index * rank : (index + 1) * rank] for index in range(len(lora_b))]


def _backend(t: torch.Tensor) -> ModuleType:
    choice = os.environ.get(BACKEND_ENV, "").lower()
    if choice not in ("", "auto", "torch", "triton"):
        raise ValueError(f"{BACKEND_ENV} must be torch, triton or auto, got {choice!r}")
    if choice == "triton" or (choice in ("", "auto") and t.is_cuda and _triton_installed()):
        from lora.ops import triton_ops  # imported late: interpret mode is fixed at import

        return triton_ops
    return torch_ops


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _as_list(tensors: Tensors) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _slice_offsets(lora_b: list[torch.Tensor], offset: int | Sequence[int]) -> list[int]:
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


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAStepMetadata) -> None:
    if x.dim() != 2 or lora_a.dim() != 3 or x.shape[1] != lora_a.shape[2]:
        raise ValueError(f"x {tuple(x.shape)} does not match lora_a {tuple(lora_a.shape)}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, metadata {meta.num_tokens}")


def _check_expand(
    rank: int, lora_b: torch.Tensor, meta: LoRAStepMetadata, out: torch.Tensor, offset: int
) -> None:
    if lora_b.dim() != 3 or lora_b.shape[2] != rank:
        raise ValueError(f"rank {rank} does not match lora_b {tuple(lora_b.shape)}")
    if out.shape[0] != meta.num_tokens or offset < 0 or offset + lora_b.shape[1] > out.shape[1]:
        raise ValueError(f"out {tuple(out.shape)} cannot take {lora_b.shape[1]} columns at {offset}")
