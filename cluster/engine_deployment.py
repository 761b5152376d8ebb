"""The engine deployment: one engine (a driver actor and its workers) per Serve replica.

Its methods are the ingress's only way to the driver. Adapter requests carry the adapter's name
as Serve's multiplexed model id, so Serve routes them preferably to a replica that already
served that adapter. A replica started later copies the adapters its peers serve (their
drivers are named actors).
"""

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from cluster.config import EngineConfig
from cluster.errors import ModelNotFoundError, RayLoRAError, as_raylora_error
from cluster.outputs import StreamDelta
from cluster.sampling_params import SamplingParams
from lora.request import LoRARequest

logger = logging.getLogger(__name__)

DRIVER_NAME_PREFIX = "raylora-driver"


@dataclass
class EngineStart:
    """First item of every engine stream: the engine accepted the request (errors come before it)."""

    replica_id: str
    request_id: str


def _driver_name(app_name: str, replica_id: str) -> str:
    return f"{DRIVER_NAME_PREFIX}:{app_name}:{replica_id}"


def _peer_drivers(app_name: str) -> list[Any]:
    """Driver actors of this application's other live engine replicas."""
    prefix = _driver_name(app_name, "")
    drivers = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            try:
                drivers.append(ray.get_actor(entry["name"], namespace=entry["namespace"]))
            except ValueError:  # it died between the listing and the lookup
                continue
    return drivers


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the workers reserve their own CPUs or GPUs
    max_ongoing_requests=256,
    health_check_timeout_s=60,
    max_constructor_retry_count=3,  # a bad model path fails the same way every time
)
class LoRAEngine:
    """One engine per replica; its methods are the ingress's only way to the driver."""

    def __init__(self, config: EngineConfig) -> None:
        from cluster.driver import launch  # torch and the model stack load only in engine replicas

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app_name = context.app_name
        self.config = config
        peers = _peer_drivers(self.app_name)
        self.driver = launch(config, name=_driver_name(self.app_name, self.replica_id))
        self._copy_adapters_from(peers)

        async def note_adapter(model_id: str) -> str:
            """Serve's multiplexing remembers the ids this returned, which routes those adapters here."""
            return model_id

        self._note_adapter = serve.multiplexed(max_num_models_per_replica=config.resolved_max_cpu_loras)(note_adapter)

    def _copy_adapters_from(self, peers: list[Any]) -> None:
        """Adapters loaded at runtime on running replicas; without them this replica would 404 on them."""
        known = {lora.lora_name for lora in ray.get(self.driver.list_loras.remote())}
        for peer in peers:
            try:
                adapters = ray.get(peer.list_loras.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            for adapter in adapters:
                if adapter.lora_name in known:
                    continue
                try:
                    ray.get(self.driver.add_lora.remote(adapter.lora_name, adapter.lora_path))
                    known.add(adapter.lora_name)
                except ray.exceptions.RayError as exc:
                    logger.warning("could not copy adapter %s from a peer: %s", adapter.lora_name, exc)

    async def info(self) -> dict[str, Any]:
        return await self.driver.info.remote() | {"replica_id": self.replica_id}

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None
    ) -> AsyncIterator[EngineStart | StreamDelta | RayLoRAError]:
        """EngineStart once the engine accepted the request, then its deltas; stopping early aborts it.

        A refused request (bad input, unknown adapter, full queue) yields its error instead of raising:
        it is an answer for the client, not a failed call that Serve would log with a traceback.
        """
        request_id = uuid.uuid4().hex
        try:
            refs = self.driver.generate_stream.remote(prompt_token_ids, params, adapter, request_id)
            delta = await self._next(refs)
        except RayLoRAError as exc:
            yield as_raylora_error(exc)
            return
        if adapter:
            await self._note_adapter(adapter)  # accepted, so this replica serves the adapter
        finished = False
        try:
            yield EngineStart(self.replica_id, request_id)
            yield delta
            while not delta.finished:
                delta = await self._next(refs)
                yield delta
            finished = True
        finally:
            if not finished:  # the caller went away, or the engine failed
                self.driver.abort.remote(request_id)

    @staticmethod
    async def _next(refs: Any) -> StreamDelta:
        return await (await refs.__anext__())

    async def list_adapters(self) -> list[LoRARequest]:
        return await self.driver.list_loras.remote()

    async def add_adapter(self, lora_name: str, lora_path: str) -> LoRARequest:
        return await self.driver.add_lora.remote(lora_name, lora_path)

    async def remove_adapter(self, lora_name: str) -> bool:
        """False when this replica does not serve it."""
        try:
            return await self.driver.remove_lora.remote(lora_name)
        except ModelNotFoundError:
            return False

    async def stats(self) -> dict[str, int]:
        return await self.driver.stats.remote()

    async def check_health(self) -> None:
        """The driver rebuilds dead workers itself; only a driver that cannot do so fails this."""
        await self.driver.check_health.remote()

    async def __del__(self) -> None:
        with contextlib.suppress(ray.exceptions.RayError):
            await self.driver.shutdown.remote()
        ray.kill(self.driver)
