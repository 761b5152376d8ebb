"""The worker actors of one engine: placed, joined into a process group, stepped together."""

from __future__ import annotations

import asyncio
import secrets

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import EngineConfig
from cluster.engine.step_channel_client import StepChannelClient
from cluster.engine.worker_placement import placement_group_name, remove_orphaned_groups
from cluster.errors import as_raylora_error
from lora.request import LoRARequest
from workers.step import DecodeContinuation, StepInput, StepOutput
from workers.step_channel import encode_call
from workers.worker import WorkerActor

PLACEMENT_TIMEOUT_S = 60.0
LOAD_POLL_S = 0.005  # first wait for the ranks' adapter reads; doubles up to the next
MAX_LOAD_POLL_S = 0.1


def wants_gpu(config: EngineConfig) -> bool:
    """`auto` means CUDA when the Ray cluster has GPUs to place workers on."""
    if config.device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= config.tensor_parallel_size
    return config.device == "cuda"


async def _first(results: asyncio.Future) -> StepOutput:
    return (await results)[0]


def _quietly(futures: list[asyncio.Future]) -> list[asyncio.Future]:
    """Futures nobody may await: their errors are retrieved so asyncio does not log them as lost
    (a dead worker is noticed by the steps and pings)."""
    for future in futures:
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return futures


class WorkerGroup:
    """N = tensor_parallel_size `WorkerActor`s, one per bundle of a placement group: the driver's
    `StepExecutor`, whose step outputs are futures.

    Once started, each rank is driven through its step channel (`workers.step_channel`), not Ray
    actor calls: its main thread serves the channel, and calls run in the order sent.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.use_gpu = wants_gpu(config)
        bundle = {"CPU": config.num_cpus_per_worker} | ({"GPU": 1} if self.use_gpu else {})
        remove_orphaned_groups()  # a dead engine's leftovers would hold the bundles this group needs
        self.placement_group: PlacementGroup = placement_group(
            [dict(bundle) for _ in range(config.tensor_parallel_size)], strategy=config.placement_strategy,
            name=placement_group_name(),
        )
        self.workers: list = []
        self.worker_nodes: list[str] = []
        self.channels: list[StepChannelClient] = []
        self._encoded_continuations: dict[int, bytes] = {}  # by num_steps

    async def start(self) -> int:
        """Place the actors, form the group, load the shards; return the KV blocks every rank can hold."""
        try:
            await asyncio.wait_for(self.placement_group.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            raise RuntimeError(
                f"could not place {self.config.tensor_parallel_size} workers with "
                f"{self.placement_group.bundle_specs[0]} each ({self.config.placement_strategy}) within "
                f"{PLACEMENT_TIMEOUT_S:.0f}s: the Ray cluster has {ray.cluster_resources()}"
            ) from exc
        worker_config = self.config.model_copy(update={"device": "cuda" if self.use_gpu else "cpu"})
        self.workers = [
            WorkerActor.options(
                num_cpus=self.config.num_cpus_per_worker,
                num_gpus=1 if self.use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank),
            ).remote(worker_config, rank)
            for rank in range(self.config.tensor_parallel_size)
        ]
        rendezvous = await self.workers[0].host_rendezvous.remote() if len(self.workers) > 1 else None
        capacities = await asyncio.gather(*(w.init_model.remote(rendezvous) for w in self.workers))
        num_blocks = min(capacities)
        await asyncio.gather(*(w.init_cache.remote(num_blocks) for w in self.workers))
        self.worker_nodes = await asyncio.gather(*(w.node_id.remote() for w in self.workers))
        await self._open_channels()
        return num_blocks

    async def _open_channels(self) -> None:
        """Each rank listens, starts serving its channel, and the driver connects with a fresh key."""
        key = secrets.token_bytes(32)
        here = ray.get_runtime_context().get_node_id()
        addresses = await asyncio.gather(*(
            w.open_step_channel.remote(key, node == here) for w, node in zip(self.workers, self.worker_nodes)
        ))
        for worker in self.workers:
            worker.serve_step_channel.remote()  # runs until the channel closes; a death shows on the channel
        self.channels = list(await asyncio.gather(*(
            StepChannelClient.connect(address, key, f"worker rank {rank}") for rank, address in enumerate(addresses)
        )))

    def submit(self, step: StepInput | DecodeContinuation) -> asyncio.Future:
        """Send the step to every rank now (each runs its calls in the order sent, so a step sent
        before the previous one returned runs after it); the future is rank 0's answer."""
        encoded = self._encode_step(step)
        if len(self.channels) == 1:
            return self.channels[0].send(encoded)
        results = asyncio.gather(*(channel.send(encoded) for channel in self.channels))
        return asyncio.ensure_future(_first(results))

    def _encode_step(self, step: StepInput | DecodeContinuation) -> bytes:
        """The call's bytes; a continuation that adds no block (most decode steps) is encoded once."""
        if isinstance(step, DecodeContinuation) and not step.new_blocks:
            encoded = self._encoded_continuations.get(step.num_steps)
            if encoded is None:
                encoded = self._encoded_continuations[step.num_steps] = encode_call("execute_step", (step,))
            return encoded
        return encode_call("execute_step", (step,))

    async def load_lora(self, lora: LoRARequest) -> None:
        """Every rank reads and checks the adapter beside the steps; returns when all have it. A rank's
        refusal (its values are bad) is raised once every rank is done, after all dropped it."""
        lora_id = lora.lora_int_id
        await asyncio.gather(*(channel.call("load_lora", lora) for channel in self.channels))
        reading, failures, wait_s = list(self.channels), [], LOAD_POLL_S
        while reading:
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, MAX_LOAD_POLL_S)
            done = await asyncio.gather(*(c.call("lora_loaded", lora_id) for c in reading), return_exceptions=True)
            failures += [result for result in done if isinstance(result, BaseException)]
            reading = [c for c, result in zip(reading, done) if result is False]
        if failures:
            await asyncio.gather(*self.remove_lora(lora_id), return_exceptions=True)
            error = as_raylora_error(failures[0])
            raise (error or failures[0]) from None

    def load_lora_nowait(self, lora: LoRARequest) -> list:
        """Every rank starts reading the adapter into its CPU cache, not waited for (a rebuilt group
        reading back what the registry lists); returns the futures."""
        return _quietly([channel.call("load_lora", lora) for channel in self.channels])

    def remove_lora(self, lora_id: int) -> list:
        """Every rank drops the adapter from its CPU cache, in order with the steps sent; returns the futures."""
        return _quietly([channel.call("remove_lora", lora_id) for channel in self.channels])

    async def lora_cache_stats(self) -> dict[str, int]:
        return await self.channels[0].call("lora_cache_stats")

    async def ping(self) -> None:
        await asyncio.gather(*(channel.call("ping") for channel in self.channels))

    def shutdown(self) -> None:
        """Kill the actors and free their bundles; safe on a group that is half dead."""
        for channel in self.channels:
            channel.close()
        for worker in self.workers:
            ray.kill(worker)
        self.channels, self.workers = [], []
        remove_placement_group(self.placement_group)
