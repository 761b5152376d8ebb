"""Continuous batching: which sequences run in the next step.

FCFS admission under the limits `max_num_seqs`, `max_num_batched_tokens`, free KV blocks and
`max_loras` distinct adapters per batch; preemption by recompute when decode runs out of
blocks. A step is either a prefill of newly admitted sequences or a decode of every running
one, as in nano-vllm: new requests join the running batch at the next step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cluster.block_manager import BlockManager
from cluster.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    num_steps: int = 1  # decode steps the workers run back to back


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_loras: int


class Scheduler:
    def __init__(self, limits: SchedulerLimits, block_manager: BlockManager) -> None:
        self.limits = limits
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, decode_steps: int = 1) -> ScheduledBatch | None:
        """A prefill of newly admitted sequences if any fit, else a decode of every running one,
        `decode_steps` steps at once when the free blocks allow it for the whole batch."""
        admitted = self._admit_waiting()
        if admitted:
            return ScheduledBatch(admitted, is_prefill=True)
        if decode_steps > 1 and self._reserve_lookahead(decode_steps):
            return ScheduledBatch(list(self.running), is_prefill=False, num_steps=decode_steps)
        decoding = self._schedule_decode()
        return ScheduledBatch(decoding, is_prefill=False) if decoding else None

    def _reserve_lookahead(self, steps: int) -> bool:
        """Blocks for `steps` more tokens of every running sequence, or nothing if they do not fit."""
        needed = sum(self.block_manager.blocks_to_append(seq, steps) for seq in self.running)
        if not self.running or needed > self.block_manager.num_free_blocks:
            return False
        for seq in self.running:
            self.block_manager.append_slots(seq, steps)
        return True

    def active_lora_ids(self) -> set[int]:
        return {seq.lora_id for seq in self.running if seq.lora_id}

    def _admit_waiting(self) -> list[Sequence]:
        """Admit waiting sequences in arrival order while every limit holds.

        Once a request is held back for want of an adapter slot, later adapter requests are held
        too, so the active adapters drain and the oldest waiting adapter gets the next slot.
        Base-model requests never wait for slots.
        """
        admitted: list[Sequence] = []
        lora_ids = self.active_lora_ids()
        num_tokens = 0
        slot_blocked = False
        for seq in list(self.waiting):
            if len(self.running) + len(admitted) >= self.limits.max_num_seqs:
                break
            if num_tokens + seq.num_tokens > self.limits.max_num_batched_tokens:
                break
            if seq.lora_id:
                needs_slot = seq.lora_id not in lora_ids
                if slot_blocked or (needs_slot and len(lora_ids) >= self.limits.max_loras):
                    slot_blocked = True
                    continue
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.lora_id:
                lora_ids.add(seq.lora_id)
            num_tokens += seq.num_tokens
            admitted.append(seq)
        self.running.extend(admitted)
        return admitted

    def _schedule_decode(self) -> list[Sequence]:
        """Every running sequence gets one slot; the newest are preempted when blocks run out."""
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.append_slots(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Drop the sequence's cache; it is recomputed from its tokens when readmitted."""
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Leave the batch: free the blocks, remove from whichever queue holds it."""
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
        for queue in (self.running, self.waiting):
            if seq in queue:
                queue.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in aborted:
            self.finish(seq, "abort")
        return aborted
