"""The driver's adapter registry: name <-> id <-> path, validated before anything is listed."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from cluster.engine.adapter_names import adapter_of_model_id, check_adapter_name
from cluster.errors import InvalidRequestError, ModelNotFoundError
from lora.request import LoRARequest


@dataclass(frozen=True)
class AdapterInfo:
    """What scheduling needs to know of an adapter beyond its name and path."""

    extra_tokens: int = 0  # added tokens, ids from the base vocabulary size on
    rope_table: int = 0  # long-context adapters: 1 + index of their factor in long_lora_scaling_factors
    # unique per registration, so KV blocks cached under an unloaded adapter never serve a new one
    # registered under the same name (prefix caching keys blocks by it); empty = no registry
    identity: bytes = b""


class LoRARegistry:
    """`validate(name, path)` returns the adapter's AdapterInfo, or raises InvalidRequestError for
    an adapter that cannot be served; it reads no tensor values. `add_loaded` lists an adapter only
    once its `load` (the workers reading and checking its values) succeeded.

    An engine started without `enable_lora` has a registry that refuses every adapter (the one place
    that rule is checked): nothing is ever listed, so a request naming an adapter finds none.
    """

    def __init__(self, validate: Callable[[str, str], AdapterInfo], base_model_name: str, enabled: bool = True) -> None:
        self._validate = validate
        self.base_model_name = base_model_name
        self.enabled = enabled
        self._by_name: dict[str, LoRARequest] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._loading: dict[str, tuple[str, asyncio.Future[LoRARequest]]] = {}  # name -> (path, add)
        self._next_id = 1

    def add(self, name: str, path: str) -> LoRARequest:
        """Validate and list at once; the workers read the values later."""
        known = self._known(name, path)
        if known is not None:
            return known
        if name in self._loading:
            raise InvalidRequestError(f"the adapter {name!r} is still being loaded: retry when its load has returned",
                                      param="lora_name")
        request, info = self._describe(name, path)
        return self._list(request, info)

    async def add_loaded(self, name: str, path: str, load: Callable[[LoRARequest], Awaitable[None]]) -> LoRARequest:
        """Validate, await `load`, then list: no request can pick an adapter before its values were
        checked. Adds of one name at once share one load; the load goes on if its caller goes away."""
        known = self._known(name, path)
        if known is not None:
            return known
        loading = self._loading.get(name)
        if loading is None:
            loading = (path, asyncio.ensure_future(self._load_and_list(name, path, load)))
            self._loading[name] = loading
            loading[1].add_done_callback(lambda done: self._end_loading(name, done))
        elif loading[0] != path:
            raise InvalidRequestError(
                f"an adapter named {name!r} is being loaded from another path: unload it once loaded",
                param="lora_name",
            )
        return await asyncio.shield(loading[1])

    async def _load_and_list(self, name: str, path: str, load: Callable[[LoRARequest], Awaitable[None]]) -> LoRARequest:
        request, info = self._describe(name, path)
        await load(request)
        return self._list(request, info)

    def _end_loading(self, name: str, done: asyncio.Future[LoRARequest]) -> None:
        if self._loading.get(name, (None, None))[1] is done:
            del self._loading[name]
        if not done.cancelled():
            done.exception()  # retrieved, so asyncio does not log a refusal nobody awaited any more

    def _known(self, name: str, path: str) -> LoRARequest | None:
        """The adapter listed under `name` from `path`; None if none is; raises for a bad or taken name."""
        check_adapter_name(name)
        if name == self.base_model_name:
            raise InvalidRequestError(f"adapter name {name!r} is the base model's name: choose another",
                                      param="lora_name")
        existing = self._by_name.get(name)
        if existing is None or existing.lora_path == path:
            return existing
        # the client is not told where the loaded one lives: paths stay on the server
        raise InvalidRequestError(
            f"an adapter named {name!r} is already loaded from another path: unload it first",
            param="lora_name",
        )

    def _describe(self, name: str, path: str) -> tuple[LoRARequest, AdapterInfo]:
        if not self.enabled:
            raise InvalidRequestError("this engine serves no LoRA adapters: start it with enable_lora", param="lora_path")
        info = self._validate(name, path)
        request = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        return request, replace(info, identity=secrets.token_bytes(16))

    def _list(self, request: LoRARequest, info: AdapterInfo) -> LoRARequest:
        self._by_name[request.lora_name] = request
        self._info[request.lora_name] = info
        return request

    def register(self, request: LoRARequest) -> LoRARequest:
        """A LoRARequest passed with a call: registered on first use (vLLM loads it then too)."""
        known = self._registered(request)
        return known if known is not None else self.add(request.lora_name, request.lora_path)

    async def register_loaded(self, request: LoRARequest, load: Callable[[LoRARequest], Awaitable[None]]) -> LoRARequest:
        """`register`, through `add_loaded` for an adapter not yet listed."""
        known = self._registered(request)
        return known if known is not None else await self.add_loaded(request.lora_name, request.lora_path, load)

    def _registered(self, request: LoRARequest) -> LoRARequest | None:
        known = self._by_name.get(request.lora_name)
        return known if known is not None and known.lora_path in ("", request.lora_path) else None

    def remove(self, name: str) -> LoRARequest:
        if name not in self._by_name:
            raise ModelNotFoundError(f"no adapter named {name!r} is loaded", param="lora_name")
        self._info.pop(name, None)
        return self._by_name.pop(name)

    def info(self, name: str) -> AdapterInfo:
        return self._info[name]

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def resolve_model(self, model: str | None) -> LoRARequest | None:
        """A request's `model`: the base model's name (or none) -> None; an adapter's name, bare or
        `base:adapter` (Ray Serve LLM's form), -> its LoRARequest; an empty or malformed id -> 400."""
        name = adapter_of_model_id(model, self.base_model_name)
        if name is None:
            return None
        request = self._by_name.get(name)
        if request is None:
            raise ModelNotFoundError(f"the model {model!r} does not exist", param="model")
        return request

    def list(self) -> list[LoRARequest]:
        return sorted(self._by_name.values(), key=lambda r: r.lora_int_id)
