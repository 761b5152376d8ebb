"""The HTTP server's `EngineClient` for the engine of its own replica: what `EngineReplicas` does over
Serve, done in process.

With one engine replica the application is one deployment: the replica serves HTTP and owns the
driver (Ray Serve LLM calls the same shape "direct streaming"), so a streamed request's deltas go
from the step loop to the SSE response in process, with no Ray hop and no second replica's event
loop between them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from cluster.engine.sampling_params import SamplingParams
from cluster.server.engine_client import adapter_not_loaded
from cluster.server.engine_deployment import EngineReplica
from lora.request import LoRARequest


class LocalStream:
    """`EngineReplica.generate` read in process; cancelling closes it, which releases the request."""

    def __init__(self, items: AsyncGenerator[Any, None]) -> None:
        self._items = items
        self._closing: asyncio.Task | None = None

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        return await self._items.__anext__()

    def cancel(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        # A reader task being cancelled may still be inside the generator: its cancellation closes it.
        with contextlib.suppress(RuntimeError):
            await self._items.aclose()


class LocalEngineClient:
    """`EngineClient` over this process's `EngineReplica`: direct calls, no Ray hop."""

    def __init__(self, replica: EngineReplica) -> None:
        self.replica = replica

    async def info(self, refresh: bool = False) -> dict[str, Any]:
        return await self.replica.info()

    async def stats(self) -> list[dict[str, int]]:
        return [await self.replica.stats()]

    async def list_loras(self) -> list[LoRARequest]:
        return await self.replica.list_loras()

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        return await self.replica.add_lora(lora_name, lora_path)

    async def remove_lora(self, lora_name: str, param: str) -> None:
        if not await self.replica.remove_lora(lora_name):
            raise adapter_not_loaded(lora_name, param)

    def open_stream(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None,
                    stream: bool) -> LocalStream:
        return LocalStream(self.replica.generate(prompt_token_ids, params, adapter, stream))
