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

    def blocks_to_cover(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks the sequence needs so that positions 0..num_tokens-1 have a cache slot."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_cover(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_to_cover(seq, num_tokens) <= len(self.free_blocks)

    def cover(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence blocks up to position num_tokens-1 (a prefill chunk, a decode token, or
        several decode steps ahead)."""
        for _ in range(self.blocks_to_cover(seq, num_tokens)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
