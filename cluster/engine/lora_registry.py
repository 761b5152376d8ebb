"""The driver's adapter registry: name <-> id <-> path, validated before anything is listed."""

from __future__ import annotations

import secrets
from collections.abc import Callable
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
    an adapter that cannot be served."""

    def __init__(self, validate: Callable[[str, str], AdapterInfo], base_model_name: str) -> None:
        self._validate = validate
        self.base_model_name = base_model_name
        self._by_name: dict[str, LoRARequest] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._next_id = 1

    def add(self, name: str, path: str) -> LoRARequest:
        check_adapter_name(name)
        if name == self.base_model_name:
            raise InvalidRequestError(f"adapter name {name!r} is the base model's name: choose another",
                                      param="lora_name")
        existing = self._by_name.get(name)
        if existing is not None:
            if existing.lora_path == path:
                return existing
            # the client is not told where the loaded one lives: paths stay on the server
            raise InvalidRequestError(
                f"an adapter named {name!r} is already loaded from another path: unload it first",
                param="lora_name",
            )
        info = self._validate(name, path)
        request = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        self._by_name[name] = request
        self._info[name] = replace(info, identity=secrets.token_bytes(16))
        return request

    def register(self, request: LoRARequest) -> LoRARequest:
        """A LoRARequest passed with a call: registered on first use (vLLM loads it then too)."""
        known = self._by_name.get(request.lora_name)
        if known is not None and known.lora_path in ("", request.lora_path):
            return known
        return self.add(request.lora_name, request.lora_path)

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
