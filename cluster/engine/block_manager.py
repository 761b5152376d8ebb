"""Which KV-cache blocks each sequence owns. Policy only: the blocks' tensors live in the workers.

With prefix caching (vLLM's automatic prefix caching, nano-vllm's hash chain) a full block is also
known by a key chained over its tokens and its parent (`cluster.engine.prefix_hash`). A new sequence
whose prompt starts with keyed blocks takes them, shared read-only and reference-counted, and
computes only the rest; it writes only past them, since only full blocks are shared. A block no
sequence holds stays keyed in the free list until its memory is needed: blocks are taken from the
free list's head, never-keyed blocks go to the head and keyed ones to the tail (least recently
freed first; a sequence's last blocks before its first, since its first are the likelier shared).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from cluster.engine.prefix_hash import ROOT, chain_block_keys
from cluster.engine.sequence import Sequence


@dataclass
class PrefixCacheStats:
    """Token counts over admissions: tokens looked up in the cache, and how many were found."""

    queries: int = 0
    hits: int = 0


class BlockManager:
    """A free list of fixed-size blocks; a sequence's block table maps its positions to blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # key -> the block holding that prefix's K/V
        self.stats = PrefixCacheStats()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are given up when needed)."""
        return len(self.free_blocks)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached)

    def blocks_to_cover(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks the sequence needs so that positions 0..num_tokens-1 have a cache slot."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_cover(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_to_cover(seq, num_tokens) <= len(self.free_blocks)

    def cover(self, seq: Sequence, num_tokens: int) -> None:
        """Give the sequence blocks up to position num_tokens-1 (a prefill chunk, a decode token, or
        several decode steps ahead)."""
        for _ in range(self.blocks_to_cover(seq, num_tokens)):
            block, _ = self.free_blocks.popitem(last=False)
            key = self.block_keys[block]
            if key is not None:  # evicted: its prefix is no longer cached
                self.block_keys[block] = None
                if self.cached.get(key) == block:
                    del self.cached[key]
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    # ---- prefix caching -------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks a waiting sequence may start with: its leading full blocks found in
        the cache, short of its last token (which must be computed for logits). Takes nothing."""
        if not self.enable_prefix_caching:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        self._extend_keys(seq, num_full)
        hits = []
        for key in seq.block_hashes[:num_full]:
            block = self.cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_take(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Whether the sequence can start with `hits` and have blocks for num_tokens positions; a
        cached block nobody holds comes out of the free list too."""
        idle_hits = sum(1 for block in hits if self.ref_counts[block] == 0)
        return self.blocks_needed(num_tokens) - len(hits) + idle_hits <= len(self.free_blocks)

    def take(self, seq: Sequence, hits: list[int]) -> None:
        """Start a waiting sequence on its cached prefix: its K/V counts as computed."""
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)
        if self.enable_prefix_caching:
            self.stats.queries += seq.num_tokens
            self.stats.hits += seq.num_cached_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly filled blocks to the cache. Call only once the steps that write
        them are sent: a block counts when every position in it is computed and every token in it
        known (a token still in flight is not). Hashes each block once, when it fills."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_tokens, len(seq.block_table) * self.block_size)
        num_full //= self.block_size
        if num_full <= seq.num_cached_blocks:
            return
        self._extend_keys(seq, num_full)
        for index in range(seq.num_cached_blocks, num_full):
            block, key = seq.block_table[index], seq.block_hashes[index]
            if self.block_keys[block] is None and key not in self.cached:
                self.cached[key] = block
                self.block_keys[block] = key
        seq.num_cached_blocks = num_full

    def _extend_keys(self, seq: Sequence, num_full: int) -> None:
        """Keys of the sequence's first num_full blocks (the chain continues from the last known)."""
        have = len(seq.block_hashes)
        if num_full <= have:
            return
        tokens = np.asarray(seq.token_slice(have * self.block_size, num_full * self.block_size), dtype=np.int64)
        parent = seq.block_hashes[-1] if have else ROOT
        seq.block_hashes += chain_block_keys(parent, tokens.reshape(num_full - have, self.block_size), seq.cache_salt)

    # ---- release --------------------------------------------------------------------------

    def free(self, seq: Sequence, cache: bool = False) -> None:
        """Give the sequence's blocks back. `cache`: its K/V is whole (its steps were sent), so its
        newly filled blocks are offered to the cache first."""
        if cache:
            self.cache_full_blocks(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                if self.block_keys[block] is None:
                    self.free_blocks.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
