"""Adapter names and model ids: which strings may name an adapter, and what a request's `model` means.

An adapter name is 1 to 128 characters of letters, digits, `.`, `_` and `-`, not starting with `.`.
No `:`, because `base:adapter` (Ray Serve LLM's form) is a model id; no `/` or `\\`, so a name never
reads as a path in logs, metrics labels or Serve's multiplexed model ids; no whitespace or control
characters, so what a client sends is what the operator sees.
"""

from __future__ import annotations

import re

from cluster.errors import InvalidRequestError

MAX_ADAPTER_NAME_CHARS = 128
ADAPTER_NAME_RULE = (
    f"1 to {MAX_ADAPTER_NAME_CHARS} characters of letters, digits, '.', '_' and '-', not starting with '.'"
)
_ADAPTER_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_ADAPTER_NAME_CHARS - 1}}}")
_SHOWN_CHARS = 40  # a name echoed in an error is cut to this length


def shown(value: str) -> str:
    """`value` as an error message quotes it: repr'd, cut so a huge name cannot flood the answer."""
    return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "...")


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None when it can."""
    if not isinstance(name, str):
        return f"adapter name must be a string, got {type(name).__name__}"
    if _ADAPTER_NAME.fullmatch(name) is None:
        return f"adapter name {shown(name)} is not valid: use {ADAPTER_NAME_RULE}"
    return None


def check_adapter_name(name: object, param: str = "lora_name") -> str:
    """`name` if it may name an adapter, else an InvalidRequestError naming `param`."""
    problem = adapter_name_problem(name)
    if problem is not None:
        raise InvalidRequestError(problem, param=param)
    assert isinstance(name, str)
    return name


def adapter_of_model_id(model: str | None, base_model_name: str) -> str | None:
    """A request's `model` -> None for the base model (named, or left out as vLLM allows), else the
    adapter's name, given bare or as `base:adapter`. An empty or malformed id is a 400, never the
    base model; a well-formed name that is not loaded is left to the caller's 404."""
    if model is None or model == base_model_name:
        return None
    adapter = model.removeprefix(base_model_name + ":")
    if adapter_name_problem(adapter) is not None:
        raise InvalidRequestError(
            f"model {shown(model)} is not a valid model id: use {base_model_name!r}, an adapter's name "
            f"({ADAPTER_NAME_RULE}), or {base_model_name!r}:<adapter name>",
            param="model",
        )
    return adapter
