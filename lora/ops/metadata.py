"""Per-step LoRA index tensors, built once per step and shared by every LoRA layer.

A step's flat batch gives each token a slot (`-1` = base model only). The ops need
that information in three shapes: the segments of consecutive tokens sharing a slot
(SGMV), the same segments cut into fixed-size tiles (one Triton program each), the
LoRA rows grouped by slot (the torch path's grouped matmuls), and, when the slots hold
similar numbers of rows (a mixed decode batch), those rows laid out as one zero-padded
[num_slots, rows_per_slot] grid (the torch path's batched matmuls). Computing them here
once keeps every layer's hot path free of Python work per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Tokens per SGMV tile: the M of its `tl.dot`, 16 being the smallest tensor-core tile.
SGMV_TILE_TOKENS = 16
# The padded per-slot grid is used while it has at most this many cells per LoRA token:
# one batched matmul over the grid beats a grouped matmul's per-slot calls until then.
MAX_GRID_CELLS_PER_ROW = 3


@dataclass(frozen=True)
class LoRAStepMetadata:
    """Which LoRA slot every token of a step uses, in the forms the ops need.

    Segments only cover LoRA tokens (slot >= 0); base-only tokens appear nowhere but in
    `token_slots`, so every op leaves them untouched.
    """

    num_tokens: int
    num_lora_tokens: int
    token_slots: torch.Tensor  # [T] int64, on the compute device
    seg_starts: torch.Tensor  # [S] int32, runs of consecutive tokens with one slot
    seg_lens: torch.Tensor  # [S] int32
    seg_slots: torch.Tensor  # [S] int32
    tile_starts: torch.Tensor  # [N] int32, segments cut into <= SGMV_TILE_TOKENS tokens
    tile_lens: torch.Tensor  # [N] int32
    tile_slots: torch.Tensor  # [N] int32
    lora_rows: slice | torch.Tensor  # `rows_by_slot`, or a slice when that is a range
    slot_ends: torch.Tensor  # [num_slots] int32, where each slot's rows end within `lora_rows`
    slot_ranges: tuple[tuple[int, int, int], ...]  # (slot, start, end) within `lora_rows`, active slots
    rows_by_slot: torch.Tensor  # [num_lora_tokens] int64, the LoRA tokens in slot order (stable)
    active_slots: frozenset[int]  # the slots with at least one token this step
    grid: SlotGrid | None = None  # the LoRA rows as a padded per-slot grid, when it is compact enough

    @property
    def num_tiles(self) -> int:
        return int(self.tile_starts.numel())

    @property
    def has_lora(self) -> bool:
        return self.num_lora_tokens > 0

    @property
    def prefers_bgmv(self) -> bool:
        """Per-row kernels win when tiles are mostly empty (decode: one token per sequence)."""
        return self.num_lora_tokens < 4 * self.num_tiles

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor | np.ndarray | Sequence[int],
        num_slots: int,
        device: torch.device | str | None = None,
    ) -> LoRAStepMetadata:
        """Index a step's per-token slots (-1 = no LoRA); tensors land on `device` (default: token_slots').

        The index arithmetic runs in numpy: these arrays are a few hundred entries, where each
        numpy call costs a microsecond and each torch call several.
        """
        if isinstance(token_slots, torch.Tensor):
            device = token_slots.device if device is None else device
            slots = token_slots.detach().cpu().numpy().astype(np.int64).reshape(-1)
        else:
            slots = np.asarray(token_slots, dtype=np.int64).reshape(-1)
        device = torch.device("cpu") if device is None else torch.device(device)
        _check_slots(slots, num_slots)

        seg_starts, seg_lens, seg_slots = _lora_segments(slots)
        tile_starts, tile_lens, tile_slots = _cut_into_tiles(seg_starts, seg_lens, seg_slots)
        ordered, counts = _rows_by_slot(slots, num_slots)
        ends = np.cumsum(counts)
        grid = SlotGrid.build(ordered, slots[ordered], counts, slots.size)
        slot_ranges = tuple(
            (slot, end - count, end) for slot, (count, end) in enumerate(zip(counts.tolist(), ends.tolist())) if count
        )

        def on_device(array: np.ndarray, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.from_numpy(array).to(device, dtype)

        rows_by_slot = on_device(ordered, torch.int64)
        return cls(
            num_tokens=int(slots.size),
            num_lora_tokens=int(ordered.size),
            token_slots=on_device(slots, torch.int64),
            seg_starts=on_device(seg_starts),
            seg_lens=on_device(seg_lens),
            seg_slots=on_device(seg_slots),
            tile_starts=on_device(tile_starts),
            tile_lens=on_device(tile_lens),
            tile_slots=on_device(tile_slots),
            lora_rows=_as_slice_if_range(ordered) or rows_by_slot,
            slot_ends=on_device(ends),
            slot_ranges=slot_ranges,
            rows_by_slot=rows_by_slot,
            active_slots=frozenset(slot for slot, _, _ in slot_ranges),
            grid=None if grid is None else grid.on(device),
        )


@dataclass(frozen=True)
class SlotGrid:
    """Every LoRA token in a [num_slots, rows_per_slot] grid, row-major, so one batched
    matmul per weight covers all slots. Cells beyond a slot's count are padding: they read
    token 0's input, and the op zeroes their rank-sized intermediate, so their delta is 0.
    Each token then reads its delta back from its cell (base tokens from a padding cell),
    a gather rather than a scatter."""

    rows_per_slot: int
    cell_tokens: torch.Tensor  # [num_slots * rows_per_slot] int64, the token in each cell
    padding: torch.Tensor | None  # [num_slots * rows_per_slot, 1] bool; None when every cell is used
    token_cells: torch.Tensor  # [num_tokens] int64, the cell holding each token's delta

    @classmethod
    def build(
        cls, ordered: np.ndarray, ordered_slots: np.ndarray, counts: np.ndarray, num_tokens: int
    ) -> SlotGrid | None:
        """From the LoRA tokens sorted by slot, their slots and the count per slot; None when
        the grid would be mostly padding (a prefill of one long prompt beside short ones)."""
        lora_tokens, num_slots = ordered.size, counts.size
        rows_per_slot = int(counts.max()) if num_slots else 0
        if num_slots * rows_per_slot == lora_tokens < num_tokens:
            rows_per_slot += 1  # base tokens need a padding cell to read their zero delta from
        if lora_tokens == 0 or num_slots * rows_per_slot > MAX_GRID_CELLS_PER_ROW * lora_tokens:
            return None
        num_cells = num_slots * rows_per_slot
        slot_starts = np.cumsum(counts) - counts
        cells = ordered_slots * rows_per_slot + np.arange(lora_tokens) - slot_starts[ordered_slots]
        cell_tokens = np.zeros(num_cells, dtype=np.int64)
        cell_tokens[cells] = ordered
        padding = None
        token_cells = np.zeros(num_tokens, dtype=np.int64)
        if num_cells > lora_tokens:
            padding = np.ones((num_cells, 1), dtype=bool)
            padding[cells] = False
            token_cells[:] = int(np.flatnonzero(padding)[0])
        token_cells[ordered] = cells
        return cls(
            rows_per_slot, torch.from_numpy(cell_tokens), None if padding is None else torch.from_numpy(padding),
            torch.from_numpy(token_cells),
        )

    def on(self, device: torch.device) -> SlotGrid:
        padding = None if self.padding is None else self.padding.to(device)
        return SlotGrid(self.rows_per_slot, self.cell_tokens.to(device), padding, self.token_cells.to(device))


def _check_slots(slots: np.ndarray, num_slots: int) -> None:
    if slots.size and (int(slots.min()) < -1 or int(slots.max()) >= num_slots):
        raise ValueError(f"token slots must lie in [-1, {num_slots}), got {slots.min()}..{slots.max()}")


def _lora_segments(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal consecutive slots, base-only runs dropped."""
    if slots.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.concatenate([[0], np.flatnonzero(slots[1:] != slots[:-1]) + 1])
    lens = np.diff(starts, append=slots.size)
    run_slots = slots[starts]
    keep = run_slots >= 0
    return starts[keep], lens[keep], run_slots[keep]


def _cut_into_tiles(
    seg_starts: np.ndarray, seg_lens: np.ndarray, seg_slots: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tiles_per_seg = (seg_lens + SGMV_TILE_TOKENS - 1) // SGMV_TILE_TOKENS
    tile_seg = np.repeat(np.arange(seg_starts.size), tiles_per_seg)
    first_tile_of_seg = np.cumsum(tiles_per_seg) - tiles_per_seg
    index_in_seg = np.arange(tile_seg.size) - first_tile_of_seg[tile_seg]
    starts = seg_starts[tile_seg] + index_in_seg * SGMV_TILE_TOKENS
    seg_ends = seg_starts[tile_seg] + seg_lens[tile_seg]
    lens = np.minimum(seg_ends - starts, SGMV_TILE_TOKENS)
    return starts, lens, seg_slots[tile_seg]


def _rows_by_slot(slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """LoRA token indices grouped by slot (one stable sort) and the count per slot."""
    lora_tokens = np.flatnonzero(slots >= 0)
    lora_slots = slots[lora_tokens]
    ordered = lora_tokens[np.argsort(lora_slots, kind="stable")]
    return ordered, np.bincount(lora_slots, minlength=num_slots)


def _as_slice_if_range(ordered: np.ndarray) -> slice | None:
    """A run of consecutive rows (one adapter, or prefill segments in slot order) as a slice, so
    the torch path skips its gather and scatter; None when the rows are no single range."""
    n = ordered.size
    if n and int(ordered[-1]) - int(ordered[0]) == n - 1 and bool((ordered[1:] > ordered[:-1]).all()):
        return slice(int(ordered[0]), int(ordered[0]) + n)
    return None
