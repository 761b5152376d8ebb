"""The contract between driver and workers: what one step computes and what rank 0 returns.

Built by the driver, identical on every rank. Arrays are numpy so they pickle compactly and
turn into tensors without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingBatch:
    """Per-sequence sampling settings as arrays, one row per sequence."""

    temperature: np.ndarray  # [B] float32, 0 = greedy
    top_p: np.ndarray  # [B] float32
    top_k: np.ndarray  # [B] int64, 0 = disabled
    noise_seed: np.ndarray  # [B] int64, the request's sampling stream
    noise_step: np.ndarray  # [B] int64, index of the token being sampled in that stream
    num_logprobs: int = -1  # top alternatives to return; -1 = no logprobs at all


@dataclass
class StepInput:
    """One forward step over the flat tokens of every scheduled sequence."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    query_lens: np.ndarray  # [B] int64 tokens computed this step per sequence
    context_lens: np.ndarray  # [B] int64 tokens in the cache after this step
    block_tables: np.ndarray  # [B, M] int64, padded with 0
    slot_mapping: np.ndarray  # [T] int64
    is_prefill: bool
    sampling: SamplingBatch
    lora_slots: np.ndarray | None = None  # [B] adapter slot per sequence, -1 = base model
    rope_tables: np.ndarray | None = None  # [B] rotary table per sequence (long-context adapters), 0 = base
    lora_loads: list = field(default_factory=list)  # slot loads to apply before the forward


@dataclass
class StepOutput:
    """Rank 0's sampled tokens, one per sequence, in the order of the step's sequences."""

    token_ids: np.ndarray  # [B] int64
    logprobs: np.ndarray | None = None  # [B] float32 log-probability of the chosen token
    top_token_ids: np.ndarray | None = None  # [B, K] int64
    top_logprobs: np.ndarray | None = None  # [B, K] float32
