"""A request's state in the driver: its tokens, its KV blocks, its place in the queues."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cluster.engine.sampling_params import SamplingParams
from lora.request import LoRARequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One prompt being completed.

    `num_computed_tokens` counts tokens whose K/V sit in the cache or are being written by a step
    already sent; `num_inflight_tokens` counts tokens sampled by steps sent but not yet processed
    (the driver schedules the next step before the current one returns).
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    lora: LoRARequest | None = None  # None is the base model
    noise_seed: int = 0  # per-request sampling stream, fixed at arrival
    rope_table: int = 0  # rotary table of a long-context adapter; 0 = the model's own
    cache_salt: bytes = b""  # what besides tokens decides its K/V (the adapter's identity): part of every block key
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # prefix caching: keys of its full blocks (a chain over its tokens, kept across preemption), how
    # many of its blocks were offered to the cache, and how many tokens its last admission found cached
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    num_inflight_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None

    @property
    def lora_id(self) -> int:
        """0 for the base model."""
        return self.lora.lora_int_id if self.lora else 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_expected_tokens(self) -> int:
        """Tokens once the ones in flight arrive: where the next step's query starts after the
        computed ones."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Token ids at positions start..stop-1 (prompt, then output)."""
        prompt_len = len(self.prompt_token_ids)
        if stop <= prompt_len:
            return self.prompt_token_ids[start:stop]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len : stop - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: stop - prompt_len]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
