"""The worker: one rank of the tensor-parallel group. It holds tensors and obeys the driver.

`Worker` is a plain class so it can also run in-process (benchmarks, tests); `WorkerActor`
is the same class as a Ray actor, one per GPU or CPU process.
"""

from __future__ import annotations

import os
from concurrent.futures import Future

import ray
import torch
import torch.distributed as dist

from cluster.config import EngineConfig
from lora.request import LoRARequest
from workers.distributed import init_tensor_parallel
from workers.memory_release import start_idle_trimmer
from workers.model_runner import ModelRunner
from workers.priority import take_normal_priority
from workers.step import DecodeContinuation, StepInput, StepOutput
from workers.step_channel import ChannelAddress, ChannelListener


def _threads_for(config: EngineConfig) -> int:
    """Ray pins OMP_NUM_THREADS to the actor's num_cpus; size torch's pool on purpose instead."""
    if config.torch_threads_per_worker:
        return config.torch_threads_per_worker
    return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


class Worker:
    """`config` is the engine's as `cluster.engine.model_checks.resolve_config` returned it: the
    limits the driver decided (max_model_len, the step's token budget) are set, and obeyed here."""

    def __init__(self, config: EngineConfig, rank: int = 0) -> None:
        if config.max_model_len is None or config.max_num_batched_tokens is None:
            raise ValueError("a worker runs the engine's resolved config: pass it through resolve_config first")
        self.config = config
        self.rank = rank
        self.runner: ModelRunner | None = None
        self.store: dist.Store | None = None
        self.loading: dict[int, Future] = {}  # adapter reads whose end the driver waits for
        self.channel: ChannelListener | None = None
        self.threads = _threads_for(config)
        torch.set_num_threads(self.threads)
        take_normal_priority()  # Ray may have started this process at niceness 15
        start_idle_trimmer()  # freed heap (adapter reads, load bursts) back to the OS once quiet

    def host_rendezvous(self) -> tuple[str, int]:
        """Rank 0: open the group's key-value store on a port the OS picks, already bound, so no
        other engine on the node can take it in between (no fixed ports, no bind race)."""
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        self.store = dist.TCPStore(host, 0, self.config.tensor_parallel_size, is_master=True, wait_for_workers=False)
        return host, self.store.port

    def init_model(self, rendezvous: tuple[str, int] | None = None) -> int:
        """Join the group, load this rank's shard; return how many KV blocks this rank can hold."""
        world_size = self.config.tensor_parallel_size
        if world_size > 1 and self.store is None:
            assert rendezvous is not None, "tensor parallel workers need rank 0's rendezvous address"
            host, port = rendezvous
            self.store = dist.TCPStore(host, port, world_size, is_master=False)
        backend = "nccl" if self.config.device == "cuda" else "gloo"
        init_tensor_parallel(self.rank, world_size, self.store, backend)
        self.runner = ModelRunner(self.config)
        return self.runner.available_kv_blocks()

    def init_cache(self, num_blocks: int) -> None:
        assert self.runner is not None
        self.runner.allocate_kv_cache(num_blocks)

    def execute_step(self, step: StepInput | DecodeContinuation) -> StepOutput | None:
        assert self.runner is not None
        return self.runner.execute(step)

    def load_lora(self, lora: LoRARequest) -> None:
        """Start reading an adapter into the CPU cache, on a background thread, and return; the read
        (its values checked) is kept for `lora_loaded`."""
        assert self.runner is not None and self.runner.lora is not None
        reading = self.runner.lora.prefetch(lora)
        if reading is not None:
            self.loading[lora.lora_int_id] = reading

    def lora_loaded(self, lora_id: int) -> bool:
        """Whether the read `load_lora` started is over, without waiting for it (steps go on);
        raises its refusal (InvalidRequestError for an adapter whose values are bad)."""
        reading = self.loading.get(lora_id)
        if reading is None:
            return True
        if not reading.done():
            return False
        del self.loading[lora_id]
        reading.result()
        return True

    def remove_lora(self, lora_id: int) -> None:
        assert self.runner is not None and self.runner.lora is not None
        self.loading.pop(lora_id, None)
        self.runner.lora.remove(lora_id)

    def lora_cache_stats(self) -> dict[str, int]:
        lora = self.runner.lora if self.runner else None
        if lora is None:
            return {}
        return {"cpu_cache_hits": lora.cache_hits, "cpu_cache_misses": lora.cache_misses,
                "cpu_cached_adapters": len(lora.cpu_cache)}

    def ping(self) -> int:
        return self.rank

    def open_step_channel(self, key: bytes, same_node: bool) -> ChannelAddress:
        """Listen for the driver's step channel (a Unix socket when it runs on this node)."""
        self.channel = ChannelListener(key, same_node, ray.util.get_node_ip_address())
        return self.channel.address

    def serve_step_channel(self) -> None:
        """Serve the driver's calls from the channel on this thread until the driver hangs up; from
        then on the driver reaches this worker only through the channel."""
        assert self.channel is not None, "open_step_channel first"
        channel, self.channel = self.channel, None
        channel.serve({
            "execute_step": self.execute_step, "load_lora": self.load_lora, "lora_loaded": self.lora_loaded,
            "remove_lora": self.remove_lora, "lora_cache_stats": self.lora_cache_stats, "ping": self.ping,
        })

    @staticmethod
    def node_id() -> str:
        """The Ray node this rank was placed on."""
        return ray.get_runtime_context().get_node_id()


# A plain (single-threaded) actor: torch runs measurably slower on a threaded actor's pool
# threads than on the actor's main thread (docs/benchmarks.md), so steps stay on the main thread
# and adapter prefetches use a background thread of the LoRA manager.
WorkerActor = ray.remote(Worker)
