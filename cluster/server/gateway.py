"""`connect(app_name)`: a `ray.get` handle to a running raylora Serve application's engines.

The engine's driver lives inside each `LoRAEngine` replica, so there is no driver actor to look up.
A Ray user (a job, a notebook attached to the cluster) gets a small gateway actor instead, with the
driver's methods and signatures (`generate`, `add_lora`, `remove_lora`, `list_loras`), which
forwards through Serve's deployment handle: requests reach the same engines, routed the same way
(an adapter's requests go preferably to a replica that already served it), as HTTP requests.

The gateway is a detached named actor, `raylora-gateway:<app_name>` in the namespace `raylora`, made
on first use (`get_if_exists`), so every job and driver of the cluster shares it. It follows its
application: once the application is deleted (`serve shutdown`, `serve delete`) it exits on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import ray

from cluster.engine.adapter_names import adapter_of_model_id
from cluster.engine.outputs import GenerationOutput, StreamDelta
from cluster.engine.prompts import aligned
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import InvalidRequestError, ModelNotFoundError, RayLoRAError, as_raylora_error
from cluster.server.engine_deployment import ENGINE_DEPLOYMENT_NAME
from cluster.server.engine_replicas import EngineReplicas
from lora.request import LoRARequest

logger = logging.getLogger(__name__)

GATEWAY_NAMESPACE = "raylora"
WATCH_INTERVAL_S = 5.0

Prompt = str | list[int]


def gateway_name(app_name: str) -> str:
    """The gateway's actor name: stable per application, so any job can look it up."""
    return f"raylora-gateway:{app_name}"


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class Gateway:
    """The driver's API over an application's engine replicas (async actor: calls run concurrently)."""

    def __init__(self, app_name: str) -> None:
        from ray import serve

        self.app_name = app_name
        self.engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT_NAME, app_name=app_name)
        self.replicas = EngineReplicas(self.engine)
        self._watch: asyncio.Task | None = None

    async def ready(self) -> str:
        """Start following the application; the first call of `connect`."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._exit_when_deleted())
        return self.app_name

    async def _exit_when_deleted(self) -> None:
        """A gateway to a deleted application would only hold a stale handle: leave with it."""
        from ray import serve

        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                alive = self.app_name in await asyncio.to_thread(lambda: serve.status().applications)
            except Exception:  # Serve itself is gone
                alive = False
            if not alive:
                logger.info("application %s is gone: the gateway exits", self.app_name)
                # exit_actor() would only end this background task: kill the actor itself.
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return

    async def info(self) -> dict[str, Any]:
        """What one engine replica serves (served model name, max_model_len, device, ...)."""
        return await self.replicas.info()

    async def _base(self) -> str:
        return (await self.replicas.info())["served_model_name"]

    # ---- adapters: every replica, as the HTTP endpoints do ----------------------------------------

    async def list_loras(self) -> list[LoRARequest]:
        return await self.replicas.list_loras()

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Validated by every replica before it serves; if one refuses, the load is undone everywhere."""
        return await self.replicas.add_lora(lora_name, lora_path)

    async def remove_lora(self, lora_name: str) -> bool:
        """Unlist an adapter on every replica; requests already running with it finish."""
        await self.replicas.remove_lora(lora_name, param="lora_request")
        return True

    # ---- requests -------------------------------------------------------------------------------

    async def _adapter_name(self, lora: LoRARequest | str | None, known: set[str] | None) -> str | None:
        """The adapter's registered name; a `LoRARequest` not yet served is added on every replica
        first (the driver's "registered on first use"), so all replicas agree on what they serve."""
        if lora is None:
            return None
        if isinstance(lora, LoRARequest):
            if known is not None and lora.lora_name not in known:
                await self.add_lora(lora.lora_name, lora.lora_path)
                known.add(lora.lora_name)
            return lora.lora_name
        return adapter_of_model_id(lora, await self._base())  # "" or "base:" is a 400, not the base model

    async def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        lora_request: LoRARequest | str | list[LoRARequest | str | None] | None = None,
    ) -> list[GenerationOutput]:
        """Complete every prompt; one output per prompt, in order (as the driver's `generate`)."""
        single = isinstance(prompts, str) or _is_token_ids(prompts)
        prompt_list: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        params_list = aligned(sampling_params, len(prompt_list), "sampling_params")
        lora_list = aligned(lora_request, len(prompt_list), "lora_request")
        known = None
        if any(isinstance(lora, LoRARequest) for lora in lora_list):
            known = {lora.lora_name for lora in await self.list_loras()}
        names = [await self._adapter_name(lora, known) for lora in lora_list]
        tasks = [asyncio.ensure_future(self._one(index, prompt, params or SamplingParams(), name, len(prompt_list)))
                 for index, (prompt, params, name) in enumerate(zip(prompt_list, params_list, names))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # one refused prompt: the others stop too (their engine requests are aborted)
            for task in tasks:
                task.cancel()

    async def _one(self, index: int, prompt: Prompt, params: SamplingParams, adapter: str | None,
                   count: int) -> GenerationOutput:
        """One prompt through the engine's stream, not streamed: EngineStart once accepted, then the whole
        completion as one item (the engine holds the deltas until the request finishes)."""
        handle = self.engine.options(stream=True, multiplexed_model_id=adapter or "")
        stream = handle.generate.remote(prompt, params, adapter, stream=False)
        finished = False
        try:
            start = await stream.__anext__()
            if isinstance(start, BaseException):
                error = as_raylora_error(start)
                if isinstance(error, InvalidRequestError) and count > 1:
                    raise InvalidRequestError(f"prompt {index}: {error.message}", error.param) from None
                raise start
            deltas: list[StreamDelta] = [start.delta] if start.delta is not None else []
            finished = bool(deltas) and deltas[-1].finished
            while not finished:
                delta = await stream.__anext__()
                if isinstance(delta, RayLoRAError):
                    raise delta
                deltas.append(delta)
                finished = delta.finished
        finally:
            if not finished:
                stream.cancel()
        if not deltas:  # never: a finished stream ends with a finished delta
            raise RayLoRAError("the engine ended the request without an answer")
        # The engine tokenizes string prompts itself: only token-id prompts have prompt_token_ids here.
        prompt_ids = list(prompt) if _is_token_ids(prompt) else []
        return GenerationOutput.of(StreamDelta.merged(deltas), prompt_ids, adapter, params.logprobs is not None)


GatewayActor = ray.remote(Gateway)


def connect(app_name: str = "raylora") -> Any:
    """The gateway actor of a running raylora Serve application (made on first use): a handle with
    the driver's methods, e.g. `ray.get(connect().generate.remote(["Hello"], params, ["pirate"]))`.

    Call it inside a connected Ray (a job's entrypoint, `ray.init(address=...)`); a driver not yet
    connected joins the cluster that `ray.init()` finds."""
    from ray import serve

    if not ray.is_initialized():
        ray.init()
    applications = serve.status().applications
    if app_name not in applications:
        raise ModelNotFoundError(
            f"no Serve application named {app_name!r} in this cluster (there are: {sorted(applications) or 'none'})",
            param="app_name",
        )
    gateway = GatewayActor.options(
        name=gateway_name(app_name), namespace=GATEWAY_NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=1000,
    ).remote(app_name)
    ray.get(gateway.ready.remote())
    return gateway
