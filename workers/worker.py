"""The worker: one rank of the tensor-parallel group. It holds tensors and obeys the driver.

`Worker` is a plain class so it can also run in-process (benchmarks, tests); `WorkerActor`
is the same class as a Ray actor, one per GPU or CPU process.
"""

from __future__ import annotations

import os
import socket

import ray
import torch

from cluster.config import EngineConfig
from workers.distributed import init_tensor_parallel
from workers.model_runner import ModelRunner
from workers.step import StepInput, StepOutput


def _threads_for(config: EngineConfig) -> int:
    """Ray pins OMP_NUM_THREADS to the actor's num_cpus; size torch's pool on purpose instead."""
    if config.torch_threads_per_worker:
        return config.torch_threads_per_worker
    return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.runner: ModelRunner | None = None
        torch.set_num_threads(_threads_for(config))

    @staticmethod
    def rendezvous_address() -> tuple[str, int]:
        """This node's address and a port free right now, for rank 0 to host the group."""
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        with socket.socket() as sock:
            sock.bind(("", 0))
            return host, sock.getsockname()[1]

    def init_model(self, init_method: str | None = None) -> int:
        """Join the group, load this rank's shard; return how many KV blocks this rank can hold."""
        backend = "nccl" if torch.cuda.is_available() and self.config.device != "cpu" else "gloo"
        init_tensor_parallel(self.rank, self.config.tensor_parallel_size, init_method or "", backend)
        self.runner = ModelRunner(self.config)
        return self.runner.available_kv_blocks()

    def init_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks)

    def execute_step(self, step: StepInput) -> StepOutput | None:
        assert self.runner is not None
        return self.runner.execute(step)

    def ping(self) -> int:
        return self.rank


WorkerActor = ray.remote(Worker)
