"""What the HTTP server needs from the engines, whether they are other replicas or its own process,
and the first item of every engine stream (`EngineStart`).

`EngineReplicas` (engine_replicas.py) reaches an application's engine replicas through a Serve
handle; `LocalEngineClient` (local_engine_client.py) reaches the engine of the replica the HTTP
server itself runs in (one engine replica: no hop between the server and the driver).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from cluster.engine.outputs import StreamDelta
from cluster.engine.sampling_params import SamplingParams
from cluster.errors import ModelNotFoundError
from lora.request import LoRARequest


@dataclass
class EngineStart:
    """First item of every engine stream: the engine accepted the request (errors come before it).

    A streamed request's first delta rides along, so the first token costs no extra item."""

    replica_id: str
    request_id: str
    delta: StreamDelta | None = None


class EngineStream(Protocol):
    """One request's engine stream: EngineStart (or the refusal), then its deltas."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    async def __anext__(self) -> Any: ...

    def cancel(self) -> None:
        """Stop reading; the engine aborts the request."""


class EngineClient(Protocol):
    async def info(self, refresh: bool = False) -> dict[str, Any]: ...

    async def stats(self) -> list[dict[str, int]]: ...

    async def list_loras(self) -> list[LoRARequest]: ...

    async def add_lora(self, lora_name: str, lora_path: str) -> LoRARequest: ...

    async def remove_lora(self, lora_name: str, param: str) -> None: ...

    def open_stream(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None,
                    stream: bool) -> EngineStream: ...


def adapter_not_loaded(lora_name: str, param: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"the adapter {lora_name!r} is not loaded", param=param)
