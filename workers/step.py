"""The contract between driver and workers: what one step computes and what rank 0 returns.

Built by the driver, identical on every rank. Arrays are numpy so they pickle compactly and
turn into tensors without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


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


@dataclass
class StepOutput:
    """Rank 0's sampled tokens: one row per sequence (in the step's order), one column per step."""

    token_ids: np.ndarray  # [B, S] int64
    logprobs: np.ndarray | None = None  # [B, S] float32 log-probability of the chosen token
    top_token_ids: np.ndarray | None = None  # [B, S, N] int64
    top_logprobs: np.ndarray | None = None  # [B, S, N] float32

    @staticmethod
    def stack(steps: list[StepOutput]) -> StepOutput:
        """Per-step outputs (each with [B] rows) side by side."""

        def column_stack(name: str) -> np.ndarray | None:
            parts = [getattr(out, name) for out in steps]
            return None if parts[0] is None else np.stack(parts, axis=1)

        return StepOutput(*(column_stack(name) for name in ("token_ids", "logprobs", "top_token_ids", "top_logprobs")))
