"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of the world size and split into equal contiguous
ranges, one per rank; the padding rows are zero. The embedding looks up the ids that fall in
this rank's range and all-reduces (every id lives on exactly one rank); the LM head computes
this rank's logit columns and all-gathers them, so every rank ends with full-vocabulary logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.distributed import all_gather, all_reduce, tp_rank, tp_world_size
from workers.layers.prepacked import linear
from workers.weight_loader import ShardId, WeightSource, copy_checked, read_slice


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = -(-num_embeddings // self.tp_size) * self.tp_size
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        # Real (non-padding) rows this rank holds: ids [vocab_start, vocab_end).
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, source: WeightSource, shard_id: ShardId = None) -> None:
        if shard_id is not None:
            raise ValueError(f"vocabulary-parallel layers are not packed, got shard {shard_id!r}")
        rows = max(self.vocab_end - self.vocab_start, 0)
        copy_checked(param.data[:rows], read_slice(source, 0, self.vocab_start, rows, self.num_embeddings))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, embedding_dim]."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        on_this_rank = (local_ids >= 0) & (local_ids < self.num_embeddings_per_partition)
        embedded = F.embedding(torch.where(on_this_rank, local_ids, 0), self.weight)
        return all_reduce(embedded.masked_fill(~on_this_rank.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Same sharded weight layout as the embedding (so the two can be tied), used as a projection."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, embedding_dim] -> logits [N, num_embeddings], identical on every rank."""
        logits = all_gather(linear(hidden, self.weight), dim=-1)
        return logits[:, : self.num_embeddings]
