"""The decode run the workers hold: the last decode step built, so that the next decode step of the
same sequences goes out as a `DecodeContinuation` (the blocks they gained) instead of being rebuilt.

A steady decode changes only positions, which every rank can advance itself from the step before.
On a host whose engine loop wakes with cold caches after every step, building and pickling a step's
arrays costs several times its back-to-back cost (docs/benchmarks.md), every step, for nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.engine.scheduler import ScheduledBatch
from lora.request import LoRARequest
from workers.step import DecodeContinuation


@dataclass
class DecodeRun:
    """What the last decode step sent was: its sequences in the scheduler's order, where each starts
    next, the row order the step put them in, and how many blocks each row's table held."""

    seq_ids: list[int]
    next_starts: list[int]
    row_order: list[int] | None  # the scheduler's order -> the step's rows (slot order); None: the same
    block_counts: list[int]  # per row
    loras: dict[int, LoRARequest]  # the step's adapters, by id
    num_preemptions: int  # the scheduler's count then: a preemption may have swapped a sequence's blocks

    @staticmethod
    def next_starts_of(batch: ScheduledBatch) -> list[int]:
        return [start + batch.num_steps for start in batch.start_positions]

    def continues(self, batch: ScheduledBatch, num_preemptions: int) -> bool:
        """`batch` (in the scheduler's order) decodes the run's sequences one step further."""
        return (
            num_preemptions == self.num_preemptions
            and batch.is_decode
            and batch.start_positions == self.next_starts
            and [seq.seq_id for seq in batch.seqs] == self.seq_ids
        )

    def continuation(self, batch: ScheduledBatch) -> DecodeContinuation:
        """Put `batch` in the run's rows and advance the run over it; the blocks its rows gained."""
        self.next_starts = self.next_starts_of(batch)
        if self.row_order is not None:
            batch.reorder(self.row_order)
        new_blocks = []
        for row, seq in enumerate(batch.seqs):
            table, held = seq.block_table, self.block_counts[row]
            if len(table) > held:
                new_blocks += [(row, index, table[index]) for index in range(held, len(table))]
                self.block_counts[row] = len(table)
        return DecodeContinuation(batch.num_steps, tuple(new_blocks))
