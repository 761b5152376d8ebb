"""The plain-torch backend: the reference path everywhere, and what the CPU kernel backend
falls back to for anything its kernel does not serve.

When the slots hold similar numbers of tokens, the LoRA tokens are gathered into the metadata's
zero-padded per-slot grid and each weight is one batched matmul (`torch.bmm`) over all slots.
Otherwise (prefill segments of different lengths) they are gathered in slot order and each weight is one grouped matmul (`torch._grouped_mm`, a loop
over groups in C++) on CPU when the shapes meet its 16-byte alignment rule, else a Python loop
over the active slots. Either way the Python work per layer is bounded by `max_loras`, never
by the number of tokens. Products run in float32, so half-precision inputs accumulate as they
do in the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lora.ops.backend import LoRABackend
from lora.ops.metadata import LoRAStepMetadata, SlotGrid

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAStepMetadata, buffer: torch.Tensor) -> None:
    """buffer[t] = x[t] @ lora_a[slot[t]].T for every LoRA token; base-token rows are left as they are."""
    buffer[meta.lora_rows] = grouped_matmul(x[meta.lora_rows], lora_a, meta)


def expand(
    buffer: torch.Tensor, lora_b: torch.Tensor, meta: LoRAStepMetadata, out: torch.Tensor, offset: int
) -> None:
    """out[t, offset:offset+size] += buffer[t] @ lora_b[slot[t]].T for every LoRA token."""
    delta = grouped_matmul(buffer[meta.lora_rows], lora_b, meta)
    _add_rows(out[:, offset : offset + lora_b.shape[1]], meta.lora_rows, delta)


class TorchBackend(LoRABackend):
    """Row-major slot buffers; batched or grouped matmuls, bounded by `max_loras` per layer."""

    _shrink = staticmethod(shrink)
    _expand = staticmethod(expand)

    def _add_stacked(
        self, out: torch.Tensor, x: torch.Tensor, stacked_a: torch.Tensor, lora_b: list[torch.Tensor],
        meta: LoRAStepMetadata, offsets: list[int],
    ) -> None:
        add_lora(out, x, stacked_a, lora_b, meta, offsets)


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    stacked_a: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    meta: LoRAStepMetadata,
    offsets: Sequence[int],
) -> None:
    """Shrink then expand without a [T, rank] buffer. A packed layer's A matrices come stacked
    ([slots, P*rank, in]), so its slices share one gather of x and one shrink."""
    rank = lora_b[0].shape[2]
    if meta.grid is not None:
        _add_lora_on_grid(out, x, stacked_a, lora_b, meta.grid, offsets, rank)
        return
    shrunk = grouped_matmul(x[meta.lora_rows], stacked_a, meta)
    for index, (b, offset) in enumerate(zip(lora_b, offsets)):
        delta = grouped_matmul(shrunk[:, index * rank : (index + 1) * rank], b, meta)
        _add_rows(out[:, offset : offset + b.shape[1]], meta.lora_rows, delta)


def _add_lora_on_grid(
    out: torch.Tensor,
    x: torch.Tensor,
    stacked_a: torch.Tensor,
    lora_b: Sequence[torch.Tensor],
    grid: SlotGrid,
    offsets: Sequence[int],
    rank: int,
) -> None:
    """One batched shrink over the [num_slots, rows_per_slot] grid, one batched expand per slice,
    and each token gathers its delta row back (base tokens gather a zero padding row)."""
    cells = x.index_select(0, grid.cell_tokens).float().view(-1, grid.rows_per_slot, x.shape[1])
    shrunk = torch.bmm(cells, stacked_a.float().transpose(1, 2))
    if grid.padding is not None:
        shrunk.masked_fill_(grid.padding.view(shrunk.shape[0], -1, 1), 0)
    for index, (b, offset) in enumerate(zip(lora_b, offsets)):
        delta = torch.bmm(shrunk[..., index * rank : (index + 1) * rank], b.float().transpose(1, 2))
        rows = delta.view(-1, b.shape[1]).index_select(0, grid.token_cells)
        out[:, offset : offset + b.shape[1]].add_(rows.to(out.dtype))


def grouped_matmul(rows: torch.Tensor, weights: torch.Tensor, meta: LoRAStepMetadata) -> torch.Tensor:
    """rows [n, K] in slot order, weights [num_slots, N, K] -> [n, N] float32, each row by its slot's matrix."""
    rows, weights_t = rows.float(), weights.float().transpose(1, 2)
    if _grouped_mm_applies(rows, weights_t):
        return torch._grouped_mm(rows, weights_t, offs=meta.slot_ends)
    result = rows.new_empty(rows.shape[0], weights.shape[1])
    for slot, start, end in meta.slot_ranges:
        torch.matmul(rows[start:end], weights_t[slot], out=result[start:end])
    return result


def _grouped_mm_applies(rows: torch.Tensor, weights_t: torch.Tensor) -> bool:
    # On CUDA `_grouped_mm` takes only bf16 on recent GPUs; there the Triton kernels are the fast path.
    return (
        _HAS_GROUPED_MM
        and rows.device.type == "cpu"
        and _aligned_for_grouped_mm(rows)
        and _aligned_for_grouped_mm(weights_t)
    )


def _aligned_for_grouped_mm(matrix: torch.Tensor) -> bool:
    """`_grouped_mm` wants 16-byte aligned data and a 16-byte leading stride in its last two dims."""
    elements = 16 // matrix.element_size()
    leading = max(matrix.stride(-2), matrix.stride(-1))
    unit = min(matrix.stride(-2), matrix.stride(-1))
    return unit == 1 and leading % elements == 0 and matrix.data_ptr() % 16 == 0


def _add_rows(target: torch.Tensor, rows: slice | torch.Tensor, delta: torch.Tensor) -> None:
    if isinstance(rows, slice):
        target[rows].add_(delta.to(target.dtype))
    else:
        target.index_add_(0, rows, delta.to(target.dtype))
