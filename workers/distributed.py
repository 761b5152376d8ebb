"""The tensor-parallel process group a worker belongs to, and the collectives layers use.

At world size 1 every collective is the identity, so models built from parallel layers run
unchanged in a single process (tests, benchmarks) and in one worker actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1


_state = ParallelState()


def init_tensor_parallel(rank: int, world_size: int, rendezvous: dist.Store | str | None, backend: str) -> None:
    """Join the group (NCCL on CUDA, gloo on CPU) through rank 0's store or an init-method URL;
    a no-op at world size 1."""
    _state.rank, _state.world_size = rank, world_size
    if world_size > 1 and not dist.is_initialized():
        if isinstance(rendezvous, str):
            dist.init_process_group(backend=backend, init_method=rendezvous, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=rendezvous, rank=rank, world_size=world_size)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state.rank, _state.world_size = 0, 1


def tp_rank() -> int:
    return _state.rank


def tp_world_size() -> int:
    return _state.world_size


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if _state.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's tensor along `dim`, in rank order."""
    if _state.world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(_state.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division with an error that says which size does not split."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})")
    return numerator // denominator
