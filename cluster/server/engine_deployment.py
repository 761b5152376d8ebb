"""The engine deployment: one engine per Serve replica, its driver in the replica's own process.

The replica constructs a `Driver` and runs its step loop as a task on the replica's event loop (the
loop Serve runs user code on; here Serve's main loop, see SINGLE_LOOP_ENV), so a request's deltas go from the step loop to the replica's stream
in process; only the worker actors stay separate. Measured on 64 streamed requests at once
(scripts/serve_cpu.py): the separate driver actor cost about 0.2 ms of its own CPU per streamed
token plus as much again in the replica receiving its per-step objects.

The stream is coalesced: the first item (EngineStart with the first delta) goes out at once, then
everything the steps added at most every `stream_interval_ms`, the finished item at once; a
non-streamed request gets EngineStart when accepted and then one finished item.

Adapter requests carry the adapter's name as Serve's multiplexed model id, so Serve routes them
preferably to a replica that already served that adapter. A replica that starts (scale-up, or
Serve replacing one that died) loads the adapters loaded at runtime: those the application's
`AdapterCatalog` records, then any its running peers serve that the record lacks (a replica is not
running, so not asked, while it starts).

What a replica owns dies with it: its worker actors are owned by the replica's process, and the
placement group it reserves for them is created by the replica, a detached actor, so Ray removes
it when the replica dies (however it dies; see docs/deploy.md). A deliberate stop releases both at once.
"""

import asyncio
import logging
import math
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import EngineConfig
from cluster.engine.outputs import StreamDelta
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import ModelNotFoundError, RayLoRAError, as_raylora_error
from cluster.server.engine_client import EngineStart
from lora.request import LoRARequest
from workers.memory_release import start_idle_trimmer
from workers.priority import take_normal_priority

logger = logging.getLogger(__name__)

PEER_TIMEOUT_S = 30.0

# Serve's own settings for the replicas on the token path (ingress and engine): user code and the
# handle's router on the replica's main event loop instead of threads of their own, which spares a
# cross-thread wake-up per streamed item (Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED does the same).
# Measured with scripts/serve_cpu.py: the serving path's CPU per streamed token 0.36-0.39 -> 0.32-0.33 ms.
# Nothing here blocks the loop: every replica method is async and the driver awaits its workers.
SINGLE_LOOP_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


# Serve's settings for any deployment whose replicas each own an engine.
ENGINE_DEPLOYMENT_OPTIONS: dict[str, Any] = dict(
    # the workers reserve their own CPUs or GPUs
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    health_check_timeout_s=60,
    health_check_period_s=2,  # how soon Serve notices a dead replica and starts another (default 10 s)
    max_constructor_retry_count=3,  # a bad model path fails the same way every time
)
# The deployment's name whichever class serves it: handles, the `ray.get` gateway and tests find the
# engines by it, and operators' Serve configs (`deployments: - name: LoRAEngine`) and process titles
# (`ServeReplica:<app>:LoRAEngine`) carry it. Keep it when renaming classes.
ENGINE_DEPLOYMENT_NAME = "LoRAEngine"


class EngineReplica:
    """One engine per replica; its methods are the only way to the driver (for the ingress, the `ray.get`
    gateway, or the HTTP server in the same replica)."""

    async def __init__(self, config: EngineConfig, catalog: DeploymentHandle | None = None) -> None:
        from cluster.engine.driver import Driver  # torch and the model stack load only in engine replicas

        take_normal_priority()  # on a Ray started without RAY_worker_niceness=0, where the OS allows it
        start_idle_trimmer()  # freed heap back to the OS once a burst is over
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.deployment_name = context.deployment
        self.config = config
        self.catalog = catalog
        self.driver = Driver(config)
        await self.driver.start()  # its step loop is a task on this event loop from here on
        await self._load_recorded_adapters()
        await self._copy_adapters_from_peers()

        async def note_adapter(model_id: str) -> str:
            """Serve's multiplexing remembers the ids this returned, which routes those adapters here."""
            return model_id

        self._note_adapter = serve.multiplexed(max_num_models_per_replica=config.resolved_max_cpu_loras)(note_adapter)

    async def _load_recorded_adapters(self) -> None:
        """Adapters loaded at runtime before this replica started, as the application's catalog has them."""
        if self.catalog is None:
            return
        try:
            recorded = await asyncio.wait_for(self.catalog.adapters.remote(), PEER_TIMEOUT_S)
        except Exception as exc:  # the catalog restarts: peers still have the adapters
            logger.warning("could not read the adapter catalog: %s", type(exc).__name__)
            return
        known = {lora.lora_name for lora in await self.driver.list_loras()}
        for lora_name, lora_path in recorded.items():
            if lora_name in known:
                continue
            try:
                await self.driver.add_lora(lora_name, lora_path)
            except RayLoRAError as exc:
                logger.warning("could not load recorded adapter %s: %s", lora_name, exc)

    async def _record(self, method: str, *args: str) -> None:
        """Tell the catalog about a runtime load or unload; the load itself stands if the catalog is away."""
        if self.catalog is None:
            return
        try:
            await asyncio.wait_for(getattr(self.catalog, method).remote(*args), PEER_TIMEOUT_S)
        except Exception as exc:
            logger.warning("could not %s adapter %s in the catalog: %s", method, args[0], type(exc).__name__)

    async def _copy_adapters_from_peers(self) -> None:
        """Adapters loaded at runtime on running replicas; without them this replica would 404 on them."""
        try:
            handle = serve.get_deployment_handle(self.deployment_name, app_name=self.app_name)
            response = handle.broadcast("list_loras")
            results = await asyncio.wait_for(
                response.results_async(timeout_s=PEER_TIMEOUT_S, return_exceptions=True), PEER_TIMEOUT_S
            )
        except Exception as exc:  # no running peer (the first replicas), or none answers in time
            logger.info("no peer replica to copy adapters from: %s", type(exc).__name__)
            return
        known = {lora.lora_name for lora in await self.driver.list_loras()}
        for adapters in results:
            if not isinstance(adapters, list):
                continue
            for adapter in adapters:
                if adapter.lora_name in known:
                    continue
                try:
                    await self.driver.add_lora(adapter.lora_name, adapter.lora_path)
                    known.add(adapter.lora_name)
                    # the catalog lacked it (it restarted): record it again
                    await self._record("record", adapter.lora_name, adapter.lora_path)
                except RayLoRAError as exc:
                    logger.warning("could not copy adapter %s from a peer: %s", adapter.lora_name, exc)

    async def info(self) -> dict[str, Any]:
        return await self.driver.info() | {"replica_id": self.replica_id}

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None, stream: bool = True
    ) -> AsyncIterator[EngineStart | StreamDelta | RayLoRAError]:
        """EngineStart once the engine accepted the request, then its deltas; stopping early aborts it.

        Streamed: EngineStart carries the first delta, then merged deltas every `stream_interval_ms`.
        Not streamed: EngineStart at once, then the whole completion as one delta.
        A refused request (bad input, unknown adapter, full queue) yields its error instead of raising:
        it is an answer for the client, not a failed call that Serve would log with a traceback.
        """
        request_id = uuid.uuid4().hex
        try:
            self.driver.submit(prompt_token_ids, params, adapter, request_id)
        except RayLoRAError as exc:
            yield as_raylora_error(exc)
            return
        interval_s = self.config.stream_interval_ms / 1000 if stream else math.inf
        deltas = self.driver.deltas(request_id, interval_s)
        try:
            if adapter:
                await self._note_adapter(adapter)  # accepted, so this replica serves the adapter
            first = await anext(deltas) if stream else None
            yield EngineStart(self.replica_id, request_id, first)
            if first is None or not first.finished:
                async for delta in deltas:
                    yield delta
        finally:  # the caller went away, or the engine failed: free the request now
            await deltas.aclose()
            self.driver.release(request_id)

    async def list_loras(self) -> list[LoRARequest]:
        return await self.driver.list_loras()

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        request = await self.driver.add_lora(lora_name, lora_path)
        await self._record("record", lora_name, request.lora_path)
        return request

    async def remove_lora(self, lora_name: str) -> bool:
        """False when this replica does not serve it."""
        await self._record("forget", lora_name)
        try:
            return await self.driver.remove_lora(lora_name)
        except ModelNotFoundError:
            return False

    async def stats(self) -> dict[str, int]:
        return await self.driver.stats()

    async def check_health(self) -> None:
        """The driver rebuilds dead workers itself; only a driver that cannot do so fails this."""
        await self.driver.check_health()

    async def worker_handles(self) -> list:
        """The worker actors (for fault-injection tests and debugging)."""
        return await self.driver.worker_handles()

    async def process_id(self) -> int:
        """This replica's process (for fault-injection tests that kill the engine)."""
        return os.getpid()

    async def __del__(self) -> None:
        """Stop the step loop and release the workers and their placement group."""
        await self.driver.shutdown()


# The engine replicas behind an ingress (several engine replicas, or separate_ingress).
EngineDeployment = serve.deployment(name=ENGINE_DEPLOYMENT_NAME, max_ongoing_requests=256,
                                    **ENGINE_DEPLOYMENT_OPTIONS)(EngineReplica)
