"""The contract between driver and workers: what one step computes and what rank 0 returns.

Built by the driver, identical on every rank. Arrays are numpy so they turn into tensors without
a copy; a step (and rank 0's answer) pickles as one buffer holding all its arrays (`pack_arrays`),
not one pickled array each, since the driver encodes a step and decodes an answer every few
milliseconds on the serving path. A steady decode's next step is sent as a `DecodeContinuation`
of the one before, which every rank keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

ArrayLayout = tuple[tuple[str, tuple[int, ...]] | None, ...]
ALIGNMENT = 8  # every array starts on a multiple of its item size (none is wider than int64)


def pack_arrays(arrays: list[np.ndarray | None]) -> tuple[ArrayLayout, bytes]:
    """The arrays' bytes back to back, each padded to ALIGNMENT, with each one's dtype and shape
    (None stays None)."""
    layout = tuple(None if array is None else (array.dtype.str, array.shape) for array in arrays)
    parts = []
    for array in arrays:
        if array is not None:
            data = array.tobytes()
            parts.append(data)
            if len(data) % ALIGNMENT:
                parts.append(bytes(-len(data) % ALIGNMENT))
    return layout, b"".join(parts)


def unpack_arrays(layout: ArrayLayout, packed: bytes) -> list[np.ndarray | None]:
    """`pack_arrays` undone: writable, aligned arrays over one copy of the bytes."""
    buffer, offset, arrays = bytearray(packed), 0, []
    for entry in layout:
        if entry is None:
            arrays.append(None)
            continue
        dtype, shape = np.dtype(entry[0]), entry[1]
        count = math.prod(shape)
        arrays.append(np.frombuffer(buffer, dtype, count, offset).reshape(shape))
        offset += -(-count * dtype.itemsize // ALIGNMENT) * ALIGNMENT
    return arrays


def cache_slots(block_tables, rows, positions, block_size: int):
    """KV-cache slot of each token: its sequence's block for the position, then the offset in it.

    Works on numpy arrays (the driver) and torch tensors (a worker feeding decode steps back).
    """
    return block_tables[rows, positions // block_size] * block_size + positions % block_size


@dataclass
class SamplingBatch:
    """Per-sequence sampling settings as arrays, one row per sequence."""

    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_p: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int64, 0 = disabled
    noise_seed: np.ndarray  # [B] int64, the request's sampling stream
    noise_step: np.ndarray  # [B] int64, index of the token being sampled in that stream
    num_logprobs: int = -1  # top alternatives to return; -1 = no logprobs at all

    def advanced(self, steps: int) -> SamplingBatch:
        """The same rows `steps` tokens later in their sampling streams."""
        return self if steps == 0 else replace(self, noise_step=self.noise_step + steps)


SAMPLING_ARRAYS = ("temperature", "top_p", "top_k", "noise_seed", "noise_step")
STEP_ARRAYS = ("input_ids", "positions", "query_lens", "context_lens", "block_tables", "slot_mapping",
               "lora_slots", "rope_tables", "prev_token_rows")


@dataclass
class StepInput:
    """One forward step over the flat tokens of every scheduled sequence."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    query_lens: np.ndarray  # [B] int64 tokens computed this step per sequence
    context_lens: np.ndarray  # [B] int64 tokens in the cache after this step
    block_tables: np.ndarray  # [B, M] int64, padded with 0
    slot_mapping: np.ndarray  # [T] int64
    is_prefill: bool  # every sequence starts at position 0: attention needs only the step's own keys
    sampling: SamplingBatch
    num_steps: int = 1  # decode steps to run, each feeding its sampled tokens to the next
    lora_slots: np.ndarray | None = None  # [B] adapter slot per sequence, -1 = base model
    rope_tables: np.ndarray | None = None  # [B] rotary table per sequence (long-context adapters), 0 = base
    lora_loads: list = field(default_factory=list)  # slot loads to apply before the forward
    # [T] row of the previous step's output whose (last) sampled token is this input token, -1 = input_ids'
    # own; set when the driver sent this step before the previous one returned (async scheduling)
    prev_token_rows: np.ndarray | None = None

    def __reduce__(self):
        sampling = self.sampling
        arrays = [getattr(self, name) for name in STEP_ARRAYS] + [getattr(sampling, name) for name in SAMPLING_ARRAYS]
        layout, packed = pack_arrays(arrays)
        return _unpack_step, (layout, packed, self.is_prefill, self.num_steps, self.lora_loads, sampling.num_logprobs)


def _unpack_step(layout: ArrayLayout, packed: bytes, is_prefill: bool, num_steps: int, lora_loads: list,
                 num_logprobs: int) -> StepInput:
    arrays = unpack_arrays(layout, packed)
    step_arrays, sampling_arrays = arrays[: len(STEP_ARRAYS)], arrays[len(STEP_ARRAYS) :]
    sampling = SamplingBatch(**dict(zip(SAMPLING_ARRAYS, sampling_arrays)), num_logprobs=num_logprobs)
    return StepInput(**dict(zip(STEP_ARRAYS, step_arrays)), is_prefill=is_prefill, sampling=sampling,
                     num_steps=num_steps, lora_loads=lora_loads)


@dataclass(frozen=True)
class DecodeContinuation:
    """The next decode step of the sequences the previous step decoded, in the same rows: each
    rank builds it from the step before it (`continue_decode`), so the driver sends only the KV
    blocks the sequences gained, not the whole step. Most steps of a steady decode are this."""

    num_steps: int = 1
    new_blocks: tuple[tuple[int, int, int], ...] = ()  # (row, index in its block table, block id)


def continue_decode(previous: StepInput, continuation: DecodeContinuation, block_size: int) -> StepInput:
    """`continuation` as a whole step: positions and context one further per step `previous` ran,
    every input token the last one `previous` sampled for its row (`prev_token_rows`), each row's
    sampling stream as far further on, the same adapter slots; no slot loads."""
    rows = len(previous.query_lens)
    if previous.is_prefill or len(previous.input_ids) != rows:
        raise ValueError("a decode continuation follows a decode step (one token per sequence)")
    advance = previous.num_steps
    block_tables = previous.block_tables
    if continuation.new_blocks:
        width = max(block_tables.shape[1], 1 + max(index for _, index, _ in continuation.new_blocks))
        block_tables = np.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))
        for row, index, block in continuation.new_blocks:
            block_tables[row, index] = block
    positions = previous.positions + advance
    row_index = np.arange(rows, dtype=np.int64)
    return StepInput(
        input_ids=np.zeros(rows, dtype=np.int64), positions=positions, query_lens=previous.query_lens,
        context_lens=previous.context_lens + advance, block_tables=block_tables,
        slot_mapping=cache_slots(block_tables, row_index, positions, block_size), is_prefill=False,
        sampling=previous.sampling.advanced(advance), num_steps=continuation.num_steps,
        lora_slots=previous.lora_slots, rope_tables=previous.rope_tables, prev_token_rows=row_index,
    )


OUTPUT_ARRAYS = ("token_ids", "logprobs", "top_token_ids", "top_logprobs")


def _unpack_output(layout: ArrayLayout, packed: bytes) -> StepOutput:
    return StepOutput(*unpack_arrays(layout, packed))


@dataclass
class StepOutput:
    """Rank 0's sampled tokens: one row per sequence (in the step's order), one column per step."""

    token_ids: np.ndarray  # [B, S] int64
    logprobs: np.ndarray | None = None  # [B, S] float32 log-probability of the chosen token
    top_token_ids: np.ndarray | None = None  # [B, S, N] int64
    top_logprobs: np.ndarray | None = None  # [B, S, N] float32

    def __reduce__(self):
        return _unpack_output, pack_arrays([getattr(self, name) for name in OUTPUT_ARRAYS])

    @staticmethod
    def stack(steps: list[StepOutput]) -> StepOutput:
        """Per-step outputs (each with [B] rows) side by side."""

        def column_stack(name: str) -> np.ndarray | None:
            parts = [getattr(out, name) for out in steps]
            return None if parts[0] is None else np.stack(parts, axis=1)

        return StepOutput(*(column_stack(name) for name in OUTPUT_ARRAYS))
