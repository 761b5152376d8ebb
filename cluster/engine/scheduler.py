"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

FCFS admission under the limits `max_num_seqs`, `max_num_batched_tokens` (the step's token
budget), free KV blocks and `max_loras` distinct adapters per batch; preemption by recompute
when the running sequences run out of blocks (the newest yields).

With chunked prefill (vLLM's default) one step mixes the running sequences' decode tokens with
prefill chunks: running sequences first (a decode token each, or the next chunk of a prompt
still being prefilled), then newly admitted prompts cut to the budget left, so an arriving
prompt never stalls the running decodes and a prompt longer than the budget is served over
several steps. Without it a step is either a prefill of whole new prompts or a decode of every
running sequence, as in nano-vllm.

The scheduler may run a step ahead of the workers: a sequence's token sampled by a step still
in flight counts in `num_expected_tokens`, and the next step computes it (the workers feed it
in themselves).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.engine.block_manager import BlockManager
from cluster.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step: per sequence, the first position it computes, how many tokens, and whether the
    step samples its next token (a prefill chunk that stops short of the prompt's end does not)."""

    seqs: list[Sequence] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    num_steps: int = 1  # decode steps the workers run back to back
    num_tokens: int = 0  # new tokens over all sequences: what the step takes of the token budget

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        """Schedule `num_new_tokens` of the sequence from its first uncomputed position."""
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.start_positions.append(start)
        self.num_new_tokens.append(num_new_tokens)
        self.samples.append(start + num_new_tokens >= seq.num_expected_tokens)
        self.num_tokens += num_new_tokens
        seq.num_computed_tokens = start + num_new_tokens

    def reorder(self, order: list[int]) -> None:
        for name in ("seqs", "start_positions", "num_new_tokens", "samples"):
            values = getattr(self, name)
            setattr(self, name, [values[index] for index in order])

    @property
    def is_prefill(self) -> bool:
        """Every sequence starts from an empty cache: attention needs only the step's own keys (a
        prompt starting with cached blocks starts after them, so it reads the cache)."""
        return all(start == 0 for start in self.start_positions)

    @property
    def is_decode(self) -> bool:
        return all(count == 1 for count in self.num_new_tokens) and not self.is_prefill


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_loras: int
    enable_chunked_prefill: bool = False
    max_model_len: int | None = None  # a sequence whose token in flight reaches it is not scheduled again


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, decode_steps: int = 1) -> ScheduledBatch | None:
        """The next step, or None when nothing can run. A pure decode step runs `decode_steps` steps
        at once when the free blocks allow it for the whole batch."""
        budget = self.limits.max_num_batched_tokens
        batch = ScheduledBatch()
        if self.limits.enable_chunked_prefill:
            self._schedule_running(batch, budget)
            admitted = self._admit_waiting(batch, budget - batch.num_tokens)
        else:
            admitted = self._admit_waiting(batch, budget)
            if not admitted:
                self._schedule_running(batch, None)
        if not batch.seqs:
            return None
        if decode_steps > 1 and not admitted and batch.is_decode:
            self._reserve_lookahead(batch, decode_steps)
        return batch

    def _reserve_lookahead(self, batch: ScheduledBatch, steps: int) -> None:
        """Blocks for `steps` decode steps of every sequence of the batch, or one step if they do not fit."""
        needed = sum(self.block_manager.blocks_to_cover(seq, seq.num_computed_tokens + steps - 1) for seq in batch.seqs)
        if needed > self.block_manager.num_free_blocks:
            return
        for seq in batch.seqs:
            self.block_manager.cover(seq, seq.num_computed_tokens + steps - 1)
            seq.num_computed_tokens += steps - 1
        batch.num_steps = steps

    def active_lora_ids(self) -> set[int]:
        return {seq.lora_id for seq in self.running if seq.lora_id}

    def _finishes_in_flight(self, seq: Sequence) -> bool:
        """Its token in flight is its last (max_tokens or max_model_len): nothing left to compute."""
        if not seq.num_inflight_tokens:
            return False
        done = seq.num_output_tokens + seq.num_inflight_tokens >= seq.sampling.max_tokens
        max_len = self.limits.max_model_len
        return done or (max_len is not None and seq.num_expected_tokens >= max_len)

    def _schedule_running(self, batch: ScheduledBatch, budget: int | None) -> None:
        """A decode token for each running sequence (or its prompt's next chunk, within `budget`);
        when blocks run out the newest running sequences are preempted, the current one last."""
        queue = list(self.running)
        index = 0
        while index < len(queue):
            seq = queue[index]
            index += 1
            wanted = seq.num_expected_tokens - seq.num_computed_tokens
            if wanted < 1 or self._finishes_in_flight(seq):
                continue
            if budget is not None:
                wanted = min(wanted, budget - batch.num_tokens)
                if wanted < 1:
                    break
            needed = seq.num_computed_tokens + wanted
            fits = self.block_manager.can_cover(seq, needed)
            while not fits and queue[-1] is not seq:
                self._preempt(queue.pop())
                fits = self.block_manager.can_cover(seq, needed)
            if not fits:
                self._preempt(seq)
                break
            self.block_manager.cover(seq, needed)
            batch.add(seq, wanted)

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> bool:
        """Admit waiting sequences in arrival order while every limit holds; True if any was.

        Without chunked prefill a prompt is admitted whole or waits; with it the last one admitted
        may be a first chunk. A prompt starting with cached blocks computes only the rest. Once a
        request is held back for want of an adapter slot, later adapter requests are held too, so
        the active adapters drain and the oldest waiting adapter gets the next slot. Base-model
        requests never wait for slots.
        """
        chunked = self.limits.enable_chunked_prefill
        admitted: list[Sequence] = []
        lora_ids = self.active_lora_ids()
        slot_blocked = False
        used = 0
        for seq in list(self.waiting):
            if len(self.running) + len(admitted) >= self.limits.max_num_seqs:
                break
            if seq.num_inflight_tokens:  # preempted while a step computing its last token was in flight
                continue
            hits = self.block_manager.cached_prefix(seq)
            num_cached = len(hits) * self.block_manager.block_size
            wanted = seq.num_expected_tokens - num_cached
            room = budget - used
            if chunked:
                wanted = min(wanted, room)
                if wanted < 1:
                    break
            elif wanted > room:
                break
            if seq.lora_id:
                needs_slot = seq.lora_id not in lora_ids
                if slot_blocked or (needs_slot and len(lora_ids) >= self.limits.max_loras):
                    slot_blocked = True
                    continue
            if not self.block_manager.can_take(seq, hits, num_cached + wanted):
                break
            self.block_manager.take(seq, hits)
            self.block_manager.cover(seq, num_cached + wanted)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.lora_id:
                lora_ids.add(seq.lora_id)
            batch.add(seq, wanted)
            admitted.append(seq)
            used += wanted
        self.running.extend(admitted)
        return bool(admitted)

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's blocks; it is recomputed from its tokens when readmitted, from its
        cached prefix on (its own blocks stay cached until their memory is needed)."""
        self.block_manager.free(seq, cache=True)
        seq.status = SequenceStatus.WAITING
        if seq in self.running:
            self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Leave the batch: free the blocks, remove from whichever queue holds it. An aborted
        sequence's blocks are not cached: a step that failed to build aborts its sequences."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq, cache=reason != "abort")
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)
