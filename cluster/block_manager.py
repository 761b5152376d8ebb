"""Which KV-cache blocks each sequence owns. Policy only: the blocks' tensors live in the workers."""

from __future__ import annotations

from collections import deque

from cluster.sequence import Sequence


class BlockManager:
    """A free list of fixed-size blocks; a sequence's block table maps its positions to blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of the sequence (a prefill, or a recompute after preemption)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        seq.block_table = [self.free_blocks.popleft() for _ in range(self.blocks_needed(seq.num_tokens))]

    def blocks_to_append(self, seq: Sequence, steps: int = 1) -> int:
        """New blocks the next `steps` decode steps need (each caches one more token)."""
        return max(0, self.blocks_needed(seq.num_tokens + steps - 1) - len(seq.block_table))

    def can_append(self, seq: Sequence, steps: int = 1) -> bool:
        return self.blocks_to_append(seq, steps) <= len(self.free_blocks)

    def append_slots(self, seq: Sequence, steps: int = 1) -> None:
        for _ in range(self.blocks_to_append(seq, steps)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0
